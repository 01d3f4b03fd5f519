"""Attention of a few query positions over one layer's KV cache, read as it is stored.

The cache holds fp16 (or fp32) keys and values; SDPA wants them in fp32, and converting the
visible part of the cache every step costs more than the attention itself at decode widths.
This kernel reads the stored values directly (fp16 -> fp32 in registers), accumulates the
scores q.k in fp32, takes the softmax in fp32 and sums the values in fp32.

Work is split as in split-K ("flash") decoding: a task is one (sequence, KV head, block of
CHUNK keys); it computes the scores of every query row of that KV head (the head's query
heads x the step's positions: grouped-query attention reads each key once, K/V are never
repeated), their block maximum, the exponentials, their sum and the weighted sum of the
block's values. The tasks run on numba's thread pool (the blocks give both threads work
even where a model has one KV head); then the blocks of each (sequence, KV head) are
combined.

Which keys a query sees is what the runtime's view says (backends/base.py `CacheView`): the
first `n_keys` slots, all of them, a causal prefix, or a host bool mask (sliding-window
rings). An MLA layer's values are the first `v_from_k` channels of its keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from diptych.backends.base import CacheView, LayerCacheSpec

from .kernel_cache import compile_listener
from .threads import sync_numba_threads

# Keys per task. Small enough that a short context still splits into blocks for both
# threads, large enough that the combine pass stays a small part of the work.
CHUNK = 128
# Widest step the kernel takes. Its cost grows with the query rows; SDPA's grows less and
# drops at 4 positions, where it overtakes the kernel on the 64-wide heads (BENCHMARKS.md,
# `bench_decode_attention.py --widths`): decode and two-token drafts come here, wider steps
# (longer drafts, prefill) go to SDPA.
MAX_QUERIES = 3
# Fewest visible slots the kernel takes. Its fork-join per layer costs more than SDPA's
# fp32 copy of a short cache: on a quiet machine SmolLM2 decoded 15% slower with it at a
# few dozen slots and 6% faster at 1024 and 2048 (BENCHMARKS.md, decode attention).
MIN_KEYS = 1024

# the kernels' float flags: reassociation and contraction let LLVM vectorize the sums;
# no "ninf"/"nnan", because masked scores are -inf
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_STORED = {torch.float16: np.uint16, torch.float32: np.float32}


@intrinsic
def _to_f32(typingctx, x):
    """float32 of a stored cache element: an fp16 bit pattern (uint16) or a float32."""
    if x == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif x == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
    else:
        return None
    return types.float32(x), codegen


@intrinsic
def _pow2(typingctx, n):
    """2.0 ** n as float32 for a whole float32 n in [-126, 127] (built from its exponent
    bits: vectorizes, where ldexp is a library call)."""
    if n != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        e = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(n), codegen


@njit(fastmath=_FAST, inline="always", cache=True)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 in float32, within 3 ulp; 0 below -87 (and for -inf). numba has no
    vector exp without Intel's SVML; this one is a polynomial LLVM vectorizes."""
    if x < np.float32(-87.0):
        return np.float32(0.0)
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    f = x - n * np.float32(0.693145751953125) - n * np.float32(1.4286068203094173e-06)
    p = np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    return p * _pow2(n)


@njit(fastmath=_FAST, cache=True)
def _scores(q, keys, scale, scores):
    """scores[r, c] = scale * q[r] . keys[c]; four keys per pass over the query row."""
    n_c, d_k = keys.shape
    for r in range(q.shape[0]):
        qr, sr = q[r], scores[r]
        for c in range(0, n_c - 3, 4):
            k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for d in range(d_k):
                x = qr[d]
                s0 += x * _to_f32(k0[d])
                s1 += x * _to_f32(k1[d])
                s2 += x * _to_f32(k2[d])
                s3 += x * _to_f32(k3[d])
            sr[c], sr[c + 1], sr[c + 2], sr[c + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        for c in range(n_c - n_c % 4, n_c):
            kr = keys[c]
            s0 = np.float32(0.0)
            for d in range(d_k):
                s0 += qr[d] * _to_f32(kr[d])
            sr[c] = s0 * scale


@njit(fastmath=_FAST, cache=True)
def _hide(scores, j0, group, lim, mask):
    """-inf where key j0 + c is not visible to row r's position t = r // group (j >= lim[t],
    or mask[t, j] false when a mask is given)."""
    has_mask = mask.shape[0] > 0
    for r in range(scores.shape[0]):
        t = r // group
        for c in range(scores.shape[1]):
            if j0 + c >= lim[t] or (has_mask and not mask[t, j0 + c]):
                scores[r, c] = -np.inf


@njit(fastmath=_FAST, cache=True)
def _exp_rows(scores, row_max, row_sum):
    """Each row's maximum, then exp(score - maximum) in place, and its sum (a row that sees
    no key of the block: maximum -inf, all zeros)."""
    for r in range(scores.shape[0]):
        sr = scores[r]
        m = np.float32(-np.inf)
        for c in range(sr.shape[0]):
            m = max(m, sr[c])
        total = np.float32(0.0)
        for c in range(sr.shape[0]):
            p = _exp_nonpositive(sr[c] - m) if m > -np.inf else np.float32(0.0)
            sr[c] = p
            total += p
        row_max[r], row_sum[r] = m, total


@njit(fastmath=_FAST, cache=True)
def _add_values(p, values, acc):
    """acc[r] += sum_c p[r, c] * values[c, :v_dim]; four values per pass over the row's sum."""
    n_c, v_dim = p.shape[1], acc.shape[1]
    for r in range(p.shape[0]):
        pr, a = p[r], acc[r]
        for c in range(0, n_c - 3, 4):
            v0, v1, v2, v3 = values[c], values[c + 1], values[c + 2], values[c + 3]
            p0, p1, p2, p3 = pr[c], pr[c + 1], pr[c + 2], pr[c + 3]
            for d in range(v_dim):
                a[d] += (p0 * _to_f32(v0[d]) + p1 * _to_f32(v1[d])
                         + p2 * _to_f32(v2[d]) + p3 * _to_f32(v3[d]))
        for c in range(n_c - n_c % 4, n_c):
            vr, p0 = values[c], pr[c]
            for d in range(v_dim):
                a[d] += p0 * _to_f32(vr[d])


@njit(fastmath=_FAST, cache=True)
def _block(q, keys, values, lim, mask, scale, j0, row_max, row_sum, acc):
    """One task: the keys j0 .. j0 + len(keys) - 1 of one KV head for all its query rows
    (q: (T * group, Dk), position-major): per row the block's maximum score, the sum of
    exp(score - maximum) and the sum of those weights times the values, into acc (rows,
    v_dim; zeros in)."""
    scores = np.empty((q.shape[0], keys.shape[0]), np.float32)
    _scores(q, keys, scale, scores)
    if mask.shape[0] > 0 or j0 + keys.shape[0] > lim.min():
        _hide(scores, j0, q.shape[0] // lim.shape[0], lim, mask)
    _exp_rows(scores, row_max, row_sum)
    _add_values(scores, values, acc)


@njit(fastmath=_FAST, cache=True)
def _combine(row_max, row_sum, acc, out):
    """out[r] = the blocks' weighted values rescaled to their common maximum, over their
    summed weights (row_max, row_sum: (blocks, rows); acc: (blocks, rows, v_dim))."""
    for r in range(out.shape[0]):
        m = np.float32(-np.inf)
        for s in range(row_max.shape[0]):
            m = max(m, row_max[s, r])
        o = out[r]
        o[:] = 0
        if m == -np.inf:  # a query that sees no key (the runtime never asks for one)
            continue
        total = np.float32(0.0)
        for s in range(row_max.shape[0]):
            w = _exp_nonpositive(row_max[s, r] - m)
            total += w * row_sum[s, r]
            a = acc[s, r]
            for d in range(o.shape[0]):
                o[d] += w * a[d]
        o *= np.float32(1.0) / total


@njit(parallel=True, cache=True)
def _attend(q, kc, vc, v_dim, lim, mask, scale, out):
    """out[b, kv, r] = softmax_j(scale * q[b, kv, r] . k_j) . v_j[:v_dim] over the keys
    j < lim[t] that mask[t, j] allows (mask of shape (0, 0): none), t = r // (rows / T):
    the rows of a KV head are its query heads at each position, position-major.
    q (B, Hkv, rows, Dk) float32; kc (B, Hkv, slots, Dk) and vc (B, Hkv, slots, >= v_dim)
    uint16 (fp16 bits) or float32; out (B, Hkv, rows, v_dim) float32."""
    n_b, n_kv, rows = q.shape[:3]
    n_keys = lim.max()
    n_split = max(1, (n_keys + CHUNK - 1) // CHUNK)
    row_max = np.empty((n_b, n_kv, n_split, rows), np.float32)
    row_sum = np.empty((n_b, n_kv, n_split, rows), np.float32)
    acc = np.zeros((n_b, n_kv, n_split, rows, v_dim), np.float32)
    for task in prange(n_b * n_kv * n_split):
        b, kv, s = task // (n_kv * n_split), (task // n_split) % n_kv, task % n_split
        j0 = s * CHUNK
        j1 = min(n_keys, j0 + CHUNK)
        _block(q[b, kv], kc[b, kv, j0:j1], vc[b, kv, j0:j1], lim, mask, scale, j0,
               row_max[b, kv, s], row_sum[b, kv, s], acc[b, kv, s])
    # serial: a CHUNK-th of the values pass, less than a second fork-join costs
    for b in range(n_b):
        for kv in range(n_kv):
            _combine(row_max[b, kv], row_sum[b, kv], acc[b, kv], out[b, kv])


def supports(q: torch.Tensor, kc: torch.Tensor, n_keys: int) -> bool:
    """Whether `attend` takes this step: inference (no autograd), fp32 queries, at most
    MAX_QUERIES positions, an fp16 or fp32 cache, at least MIN_KEYS visible slots."""
    return (q.shape[1] <= MAX_QUERIES and n_keys >= MIN_KEYS and q.dtype == torch.float32
            and kc.dtype in _STORED and not (q.requires_grad and torch.is_grad_enabled()))


def _stored(x: torch.Tensor) -> np.ndarray:
    """The cache buffer as numba reads it: fp16 as its uint16 bits (no copy)."""
    if x.dtype == torch.float16:
        x = x.view(torch.int16)
        return x.numpy().view(np.uint16)
    return x.numpy()


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor | None, spec: LayerCacheSpec,
           view: CacheView, scale: float) -> torch.Tensor:
    """q (B, T, H, Dk) over one layer's cache (B, Hkv, slots, Dk), which holds this step's
    keys, as `view` says -> (B, T, H * value dim) float32 (as TorchBackend.attend_cache)."""
    batch, n, heads, d_k = q.shape
    n_kv = kc.shape[1]
    n_keys, mask = view.n_keys, view.mask
    if isinstance(mask, str):  # "causal": query t sees the first n_keys - n + t + 1 slots
        lim = np.arange(n_keys - n + 1, n_keys + 1, dtype=np.int64)
    else:
        lim = np.full(n, n_keys, dtype=np.int64)
    if mask is None or isinstance(mask, str):
        mask = np.zeros((0, 0), dtype=np.bool_)
    v_dim = spec.v_from_k or vc.shape[-1]
    keys = _stored(kc)
    values = keys if vc is None else _stored(vc)
    # rows of a KV head: its query heads at each position, position-major
    rows = q.detach().reshape(batch, n, n_kv, heads // n_kv, d_k).transpose(1, 2)
    qn = rows.reshape(batch, n_kv, -1, d_k).contiguous().numpy()
    out = np.empty((batch, n_kv, qn.shape[2], v_dim), np.float32)
    sync_numba_threads(torch.get_num_threads())
    args = (qn, keys, values, v_dim, lim, np.ascontiguousarray(mask, dtype=np.bool_),
            np.float32(scale), out)
    if _attend.signatures:
        _attend(*args)
    else:
        _first_call(args)
    out = torch.from_numpy(out).reshape(batch, n_kv, n, -1).transpose(1, 2)
    return out.reshape(batch, n, heads * v_dim)


def _first_call(args) -> None:
    """The first call in this process: it compiles the kernel (several seconds) or loads it
    from numba's on-disk cache. Compiling is announced to the backend's compile listener
    (kernel_cache.set_compile_listener) when numba's cache holds no version of the kernel
    yet (one cache index serves both stored dtypes)."""
    listener = compile_listener()
    cache = Path(_attend._cache.cache_path)
    if listener is None or any(cache.glob(f"{__name__.rsplit('.', 1)[-1]}._attend-*.nbi")):
        _attend(*args)
        return
    listener("the decode attention kernel")
    try:
        _attend(*args)
    finally:
        listener(None)
