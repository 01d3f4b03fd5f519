"""Attention of a few query positions over one layer's KV cache, read as it is stored.

The cache holds fp16 (or fp32) keys and values; SDPA wants them in fp32, and converting the
visible part of the cache every step costs more than the attention itself at decode widths.
This kernel reads the stored values directly (fp16 -> fp32 in registers), accumulates the
scores q.k in fp32, takes the softmax in fp32 and sums the values in fp32.

Work is split as in split-K ("flash") decoding: a task is one (sequence, KV head, block of
CHUNK keys); it computes the scores of every query row of that KV head (the head's query
heads x the step's positions: grouped-query attention reads each key once, K/V are never
repeated), their block maximum, the exponentials, their sum and the weighted sum of the
block's values. Over a long cache the tasks run on numba's thread pool (the blocks give
both threads work even where a model has one KV head), over a short one on the calling
thread; then the blocks of each (sequence, KV head) are combined. `store` writes a step's
keys and values into the cache (fp32 -> fp16 as torch rounds), so that a decode step's
attention is two kernel calls and no torch op.

Which keys a query sees is the runtime's slot policy (diptych.inference.slots.visible) read
from the step's arrays, its positions and a ring's slot positions (`_visibility`), not from
a CacheView's host facts: a replayed step (step_tape.py) gets new arrays and no new view.
An MLA layer's values are the first `v_from_k` channels of its keys.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from diptych.backends.base import LayerCacheSpec

from .cached_njit import cached_njit
from .decode_ops import as_numpy
from .fast_exp import FAST_MATH, exp_nonpositive
from .kernel_cache import call_announced
from .step_tape import copy, run
from .threads import sync_numba_threads

# Keys per task. Small enough that a short context still splits into blocks for both
# threads, large enough that the combine pass stays a small part of the work.
CHUNK = 128
# Widest step the kernels take: decode and the verify widths of the default draft length
# (a draft of diptych.inference.speculative.DEFAULT_DRAFT_MAX = 8 tokens is verified in a
# step of 9 positions, which test_decode_attention holds; steps the kernels take give
# one-position steps' bits on the int8 path, see _block). Alone, SDPA overtakes the kernel
# at 4 positions on the 64-wide heads (`bench_decode_attention.py --widths`), but a whole
# verify step of 4 to 8 positions was as fast or faster through the kernels, which skip
# SDPA's fp32 copy of the cache and the cache write's torch ops (BENCHMARKS.md).
MAX_QUERIES = 9
# Fewest visible slots for which the blocks of keys run on numba's thread pool; shorter
# caches run on the calling thread. The fork-join per layer costs more than splitting a
# short cache saves (SmolLM2 decoded 15% slower with the parallel kernel at a few dozen
# slots); past a block of keys the serial kernel is slower, and it also outlasts the
# idle workers' spin (threads.SPIN_COUNT), so that the next kernel waits for them to wake
# (BENCHMARKS.md, decode attention).
MIN_KEYS = 128

_STORED = {torch.float16: np.uint16, torch.float32: np.float32}
_NO_MASK = np.zeros((0, 0), dtype=np.bool_)  # the kernels' "no mask array"


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


@cached_njit(fastmath=FAST_MATH)
def _scores(q, keys, scale, counts, scores):
    """scores[r, c] = scale * q[r] . keys[c] for c < counts[r]; four keys per pass over the
    query row."""
    d_k = keys.shape[1]
    for r in range(q.shape[0]):
        qr, sr, n_c = q[r], scores[r], counts[r]
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


@cached_njit(fastmath=FAST_MATH)
def _hide(scores, j0, group, counts, mask):
    """-inf where key j0 + c (c < counts[r]) is outside row r's window: mask[t, j0 + c]
    false, t = r // group."""
    for r in range(scores.shape[0]):
        t = r // group
        for c in range(counts[r]):
            if not mask[t, j0 + c]:
                scores[r, c] = -np.inf


@cached_njit(fastmath=FAST_MATH)
def _exp_rows(scores, counts, row_max, row_sum):
    """Each row's maximum over its first counts[r] scores, then exp(score - maximum) in
    place, and its sum (a row that sees no key of the block: maximum -inf, all zeros)."""
    for r in range(scores.shape[0]):
        sr, n_c = scores[r], counts[r]
        m = np.float32(-np.inf)
        for c in range(n_c):
            m = max(m, sr[c])
        total = np.float32(0.0)
        for c in range(n_c):
            p = exp_nonpositive(sr[c] - m) if m > -np.inf else np.float32(0.0)
            sr[c] = p
            total += p
        row_max[r], row_sum[r] = m, total


@cached_njit(fastmath=FAST_MATH)
def _add_values(p, values, counts, acc):
    """acc[r] += sum_c p[r, c] * values[c, :v_dim] over c < counts[r]; four values per pass
    over the row's sum."""
    v_dim = acc.shape[1]
    for r in range(p.shape[0]):
        pr, a, n_c = p[r], acc[r], counts[r]
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


@cached_njit(fastmath=FAST_MATH)
def _block(q, keys, values, lim, mask, scale, j0, row_max, row_sum, acc):
    """One task: the keys j0 .. j0 + len(keys) - 1 of one KV head for all its query rows
    (q: (T * group, Dk), position-major): per row the block's maximum score, the sum of
    exp(score - maximum) and the sum of those weights times the values, into acc (rows,
    v_dim; zeros in).

    Each row runs over its own visible keys only (j < lim[t]), never over a later query's:
    a row's arithmetic is then the same whatever the step's width, so a query's output is
    the same bits in a verify step as in a one-position step (speculative decoding on the
    int8 path is exact; test_decode_attention)."""
    group = q.shape[0] // lim.shape[0]
    counts = np.empty(q.shape[0], np.int64)
    for r in range(q.shape[0]):
        counts[r] = min(keys.shape[0], max(0, lim[r // group] - j0))
    scores = np.empty((q.shape[0], keys.shape[0]), np.float32)
    _scores(q, keys, scale, counts, scores)
    if mask.shape[0] > 0:
        _hide(scores, j0, group, counts, mask)
    _exp_rows(scores, counts, row_max, row_sum)
    _add_values(scores, values, counts, acc)


@cached_njit(fastmath=FAST_MATH)
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
            w = exp_nonpositive(row_max[s, r] - m)
            total += w * row_sum[s, r]
            a = acc[s, r]
            for d in range(o.shape[0]):
                o[d] += w * a[d]
        o *= np.float32(1.0) / total


@cached_njit(fastmath=FAST_MATH, inline="always")
def _task(task, q, kc, vc, lim, mask, scale, row_max, row_sum, acc):
    """Task `task` of `_attend`: one (sequence, KV head, block of CHUNK keys)."""
    n_kv, n_split = q.shape[1], row_max.shape[2]
    b, kv, s = task // (n_kv * n_split), (task // n_split) % n_kv, task % n_split
    j0 = s * CHUNK
    j1 = min(lim.max(), j0 + CHUNK)
    _block(q[b, kv], kc[b, kv, j0:j1], vc[b, kv, j0:j1], lim, mask, scale, j0,
           row_max[b, kv, s], row_sum[b, kv, s], acc[b, kv, s])


@cached_njit()
def _partials(q, lim, v_dim):
    """Each task's block maximum, exponential sum and weighted values, per (sequence, KV
    head, block of CHUNK keys, query row)."""
    n_b, n_kv, rows = q.shape[:3]
    n_split = max(1, (lim.max() + CHUNK - 1) // CHUNK)
    return (np.empty((n_b, n_kv, n_split, rows), np.float32),
            np.empty((n_b, n_kv, n_split, rows), np.float32),
            np.zeros((n_b, n_kv, n_split, rows, v_dim), np.float32))


@cached_njit()
def _combine_all(row_max, row_sum, acc, out):
    for b in range(out.shape[0]):
        for kv in range(out.shape[1]):
            _combine(row_max[b, kv], row_sum[b, kv], acc[b, kv], out[b, kv])


@cached_njit(parallel=True)
def _attend(q, kc, vc, v_dim, lim, mask, scale, out):
    """out[b, kv, r] = softmax_j(scale * q[b, kv, r] . k_j) . v_j[:v_dim] over the keys
    j < lim[t] that mask[t, j] allows (mask of shape (0, 0): none), t = r // (rows / T):
    the rows of a KV head are its query heads at each position, position-major.
    q (B, Hkv, rows, Dk) float32; kc (B, Hkv, slots, Dk) and vc (B, Hkv, slots, >= v_dim)
    uint16 (fp16 bits) or float32; out (B, Hkv, rows, v_dim) float32."""
    row_max, row_sum, acc = _partials(q, lim, v_dim)
    for task in prange(row_max.shape[0] * row_max.shape[1] * row_max.shape[2]):
        _task(task, q, kc, vc, lim, mask, scale, row_max, row_sum, acc)
    # serial: a CHUNK-th of the values pass, less than a second fork-join costs
    _combine_all(row_max, row_sum, acc, out)


@cached_njit()
def _attend_serial(q, kc, vc, v_dim, lim, mask, scale, out):
    """`_attend` on the calling thread alone (short caches: no fork-join)."""
    row_max, row_sum, acc = _partials(q, lim, v_dim)
    for task in range(row_max.shape[0] * row_max.shape[1] * row_max.shape[2]):
        _task(task, q, kc, vc, lim, mask, scale, row_max, row_sum, acc)
    _combine_all(row_max, row_sum, acc, out)


@intrinsic
def _stored_like(typingctx, x, like):
    """float32 x as a cache element of like's type: fp16 bits (uint16, round to nearest
    even as torch's .to(float16)) or float32."""
    if x != types.float32 or like not in (types.uint16, types.float32):
        return None

    def codegen(context, builder, sig, args):
        if like == types.float32:
            return args[0]
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return like(x, like), codegen


@cached_njit()
def _store(x, slots, cache):
    """cache[b, h, slots[b, t]] = x[b, t, h]: x (B, T, Hkv, D) float32, any strides."""
    n_b, n_t, n_h, n_d = x.shape
    if cache.shape[0] != n_b or cache.shape[1] != n_h or cache.shape[3] != n_d:
        raise ValueError("store: the step's keys or values do not fit the cache")
    for b in range(n_b):
        for t in range(n_t):
            s = slots[b, t]
            if s < 0 or s >= cache.shape[2]:
                raise IndexError("store: slot outside the cache")
            for h in range(n_h):
                src, dst = x[b, t, h], cache[b, h, s]
                for d in range(n_d):
                    dst[d] = _stored_like(src[d], dst[d])


def supports(q: torch.Tensor, kc: torch.Tensor) -> bool:
    """Whether `store` and `attend` take this step: inference mode (the engine's forwards;
    training keeps torch's ops, as decode_ops.applies says), fp32 queries, at most
    MAX_QUERIES positions, an fp16 or fp32 cache."""
    return (q.shape[1] <= MAX_QUERIES and q.dtype == torch.float32
            and kc.dtype in _STORED and torch.is_inference_mode_enabled())


def stored(x: torch.Tensor) -> np.ndarray:
    """A cache buffer as the kernels read and write it: fp16 as its uint16 bits (a view,
    no copy)."""
    if x.dtype == torch.float16:
        x = x.view(torch.int16)
        return x.numpy().view(np.uint16)
    return x.numpy()


def store(k: torch.Tensor, v: torch.Tensor | None, keys: np.ndarray, values: np.ndarray | None,
          slots: torch.Tensor) -> None:
    """Write a step's keys and values (B, T, Hkv, D) into one layer's cache (B, Hkv, slots,
    D; `stored` views) at `slots` (B, T), converted to the cache's dtype."""
    where = slots.numpy()
    kn = as_numpy(k)
    run(_store, kn, where, keys, reads=(kn, where))
    if values is not None:
        vn = as_numpy(v)
        run(_store, vn, where, values, reads=(vn, where))


@cached_njit()
def _visibility(positions, key_pos, window, slots, lim, mask):
    """lim[t] = the slots query t (at positions[0, t]; every row of a step is at the same
    positions) attends over: position p lives in slot p % slots, so the slots below
    min(pos + 1, slots); in a ring (window > 0; key_pos[0, j] the position slot j holds
    after the step's writes, -1 empty) mask[t, j] = whether that key is in its window. The
    slot policy's rule (diptych.inference.slots.visible), read from the step's arrays as a
    replayed step must."""
    for t in range(positions.shape[1]):
        pos = positions[0, t]
        lim[t] = min(pos + 1, slots)
        if window == 0:
            continue
        for j in range(lim[t]):
            p = key_pos[0, j]
            mask[t, j] = p >= 0 and p <= pos and pos - p < window


def attend(q: torch.Tensor, keys: np.ndarray, values: np.ndarray | None, spec: LayerCacheSpec,
           positions: torch.Tensor, key_pos: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q (B, T, H, Dk) over one layer's cache (B, Hkv, slots, Dk; `stored` views; values
    None for MLA), which holds this step's keys -> (B, T, H * value dim) float32 (as
    TorchBackend.attend_cache). Which keys each query sees is read from the step's
    positions (B, T) and, in a ring, the positions its slots hold (CacheView.key_pos), as
    a taped step (step_tape.py) replays it. From MIN_KEYS visible slots on, the blocks of
    keys run on numba's thread pool."""
    batch, n, heads, d_k = q.shape
    n_kv = keys.shape[1]
    group = heads // n_kv
    v_dim = spec.v_from_k or values.shape[-1]
    if values is None:
        values = keys
    qn = as_numpy(q)
    if n > 1:  # rows of a KV head: its query heads at each position, position-major
        qn = copy(qn.reshape(batch, n, n_kv, group, d_k).transpose(0, 2, 1, 3, 4))
    qn = qn.reshape(batch, n_kv, n * group, d_k)
    pos = positions.numpy()
    reads = (qn, pos)
    if spec.window:
        kp = key_pos.numpy()
        reads += (kp,)
        mask = np.empty((n, keys.shape[2]), np.bool_)
    else:
        kp, mask = pos, _NO_MASK
    lim = np.empty(n, np.int64)
    out = np.empty((batch, n_kv, n * group, v_dim), np.float32)
    run(_attend_visible, qn, keys, values, v_dim, pos, kp, spec.window, lim, mask,
        np.float32(scale), out, reads=reads, writes=(lim, mask, out))
    if n > 1:
        out = copy(out.reshape(batch, n_kv, n, group, v_dim).transpose(0, 2, 1, 3, 4))
    return torch.from_numpy(out.reshape(batch, n, heads * v_dim))


def _attend_visible(q, keys, values, v_dim, positions, key_pos, window, lim, mask, scale, out):
    _visibility(positions, key_pos, window, keys.shape[2], lim, mask)
    kernel = _attend if lim[-1] >= MIN_KEYS else _attend_serial  # lim[-1]: the most keys
    if kernel is _attend:
        sync_numba_threads(torch.get_num_threads())
    call_announced(kernel, (q, keys, values, v_dim, lim, mask, scale, out),
                   "decode attention kernel")
