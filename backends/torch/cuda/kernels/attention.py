"""Decode attention over a KV cache: split-K (flash-decoding), GQA-aware, causal by position.

Queries are few (one decode token, or the k+1 tokens of a speculative verification) and the
cache is long, so the work is split along the keys: grid (sequence x KV head, split), each
program scans one contiguous range of cache slots for all the query heads that share its KV
head (K and V are read once per KV head) and writes an unnormalised partial output with its
running max and sum; `_combine` merges the splits. The split count depends only on the
cache capacity, and lengths and positions are read from device arrays, so a CUDA graph
captured once replays for every position.

Visibility: query t of sequence b (position qpos[b, t]) sees a key at position p iff
0 <= p <= qpos[b, t] and, with a window W > 0, p > qpos[b, t] - W. A slot's key position:
  KEYS_FULL      slot s holds position s (a full cache, or a window over a full cache);
  KEYS_EXPLICIT  slot_pos[b, s] gives it (-1: empty): a ring buffer, whose slots the
                 runtime's slot policy assigns (diptych.inference.slots).
The cache write (`write_kv`) is separate, and comes first, into the slots the caller gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KEYS_FULL = 0
KEYS_EXPLICIT = 1

LOG2E = 1.4426950408889634
BLOCK_S = 64  # keys per inner step
TARGET_PROGRAMS = 256  # split so that (sequences x KV heads x splits) fills a large GPU


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def n_splits(capacity: int, n_groups: int, block_s: int = BLOCK_S,
             target: int = TARGET_PROGRAMS) -> int:
    """Splits for a cache of `capacity` slots and `n_groups` (sequence, KV head) programs."""
    return max(1, min(triton.cdiv(capacity, block_s), triton.cdiv(target, n_groups)))


@triton.jit
def _key_positions(slots, smask, slot_pos_ptr, b, S, KEYS: tl.constexpr):
    if KEYS == 1:
        return tl.load(slot_pos_ptr + b * S + slots, mask=smask, other=-1)
    else:
        return slots


@triton.jit
def _attend_block(q, k, v, scores_extra, kpos, qpos, smask, window, sm_scale, m_i, l_i, acc,
                  IEEE: tl.constexpr):
    """One online-softmax step over a block of keys (exp2 domain)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = (s + scores_extra) * sm_scale
    ok = smask[None, :] & (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    ok = ok & ((kpos[None, :] > qpos[:, None] - window) | (window <= 0))
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _split_range(lo, hi, split, n_split, BS: tl.constexpr):
    """The split's share of slots [lo, hi), in whole blocks."""
    chunk = tl.cdiv(tl.cdiv(hi - lo, n_split), BS) * BS
    start = lo + split * chunk
    return start, tl.minimum(start + chunk, hi)


@triton.jit
def _gqa_split(q_ptr, k_ptr, v_ptr, qpos_ptr, slot_pos_ptr, po_ptr, pm_ptr, pl_ptr,
               T, S, D, window, sm_scale, n_split,
               sq_b, sq_t, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
               HKV: tl.constexpr, G: tl.constexpr, KEYS: tl.constexpr, IEEE: tl.constexpr,
               BR: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    r = tl.arange(0, BR)  # query rows: head g of the group, token t; r = g * T + t
    rmask = r < G * T
    t = r % T
    head = hk * G + r // T
    d = tl.arange(0, BD)
    dmask = d < D
    qpos = tl.load(qpos_ptr + b * T + t, mask=rmask, other=-1)
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    last_pos = tl.max(qpos, axis=0)
    first_pos = tl.min(tl.where(rmask, qpos, last_pos), axis=0)
    if KEYS == 0:
        lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
        hi = tl.minimum(last_pos + 1, S)
    else:
        lo = 0
        hi = S
    start, end = _split_range(lo, hi, split, n_split, BS)

    m_i = tl.full((BR,), float("-inf"), tl.float32)
    l_i = tl.zeros((BR,), tl.float32)
    acc = tl.zeros((BR, BD), tl.float32)
    kv_mask = dmask[None, :]
    for s0 in range(start, end, BS):
        slots = s0 + tl.arange(0, BS)
        smask = slots < end
        kpos = _key_positions(slots, smask, slot_pos_ptr, b, S, KEYS)
        k = tl.load(k_ptr + b * sk_b + hk * sk_h + slots[:, None] * sk_s + d[None, :],
                    mask=smask[:, None] & kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + hk * sv_h + slots[:, None] * sv_s + d[None, :],
                    mask=smask[:, None] & kv_mask, other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, 0.0, kpos, qpos, smask, window, sm_scale,
                                      m_i, l_i, acc, IEEE)
    _store_partial(po_ptr, pm_ptr, pl_ptr, bh, split, n_split, r, d, rmask, dmask,
                   m_i, l_i, acc, BR, BD)


@triton.jit
def _store_partial(po_ptr, pm_ptr, pl_ptr, bh, split, n_split, r, d, rmask, dmask,
                   m_i, l_i, acc, BR: tl.constexpr, BD: tl.constexpr):
    """Partials are laid out (program group, split, BR rows[, BD])."""
    row = (bh * n_split + split) * BR + r
    tl.store(pm_ptr + row, m_i, mask=rmask)
    tl.store(pl_ptr + row, l_i, mask=rmask)
    tl.store(po_ptr + row[:, None].to(tl.int64) * BD + d[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _combine(po_ptr, pm_ptr, pl_ptr, out_ptr, n_split, T, D, so_b, so_t, so_h,
             NX: tl.constexpr, GROUP: tl.constexpr, H: tl.constexpr,
             BR: tl.constexpr, BD: tl.constexpr, BSPLIT: tl.constexpr):
    """Merge the splits of row r of program group bh into out[b, t, head, :D]:
    b = bh // NX, head = (bh % NX) * GROUP + r // T, t = r % T."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    head = (bh % NX) * GROUP + r // T
    sp = tl.arange(0, BSPLIT)
    spmask = (sp < n_split) & (head < H)  # rows past the last head hold no partials
    d = tl.arange(0, BD)
    dmask = d < D
    row = (bh * n_split + sp) * BR + r
    m = tl.load(pm_ptr + row, mask=spmask, other=float("-inf"))
    l = tl.load(pl_ptr + row, mask=spmask, other=0.0)
    o = tl.load(po_ptr + row[:, None].to(tl.int64) * BD + d[None, :],
                mask=spmask[:, None] & dmask[None, :], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    total = tl.sum(w * l, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (bh // NX) * so_b + (r % T) * so_t + head * so_h + d,
             res.to(out_ptr.dtype.element_ty), mask=dmask & (head < H))


@triton.jit
def _write_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T, S, D,
              sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_h, sc_s, svc_b, svc_h, svc_s,
              HKV: tl.constexpr, HAS_V: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)  # (b, t, kv head)
    hk = pid % HKV
    t = (pid // HKV) % T
    b = pid // (HKV * T)
    slot = tl.load(slot_ptr + b * T + t)
    d = tl.arange(0, BD)
    mask = (d < D) & (slot >= 0) & (slot < S)
    k = tl.load(k_ptr + b * sk_b + t * sk_t + hk * sk_h + d, mask=mask, other=0.0)
    tl.store(kc_ptr + b * sc_b + hk * sc_h + slot * sc_s + d, k.to(kc_ptr.dtype.element_ty),
             mask=mask)
    if HAS_V:
        v = tl.load(v_ptr + b * sv_b + t * sv_t + hk * sv_h + d, mask=mask, other=0.0)
        tl.store(vc_ptr + b * svc_b + hk * svc_h + slot * svc_s + d,
                 v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor,
             v_cache: torch.Tensor | None, slots: torch.Tensor) -> None:
    """k, v (B, T, Hkv, D) into caches (B, Hkv, S, D) at the (B, T) `slots`.
    v None: keys only (MLA, whose values are part of the keys)."""
    batch, n, hkv, dim = k.shape
    slots = slots.contiguous()
    has_v = v is not None
    v, v_cache = (v, v_cache) if has_v else (k, k_cache)
    _write_kv[(batch * n * hkv,)](
        k, v, k_cache, v_cache, slots, n, k_cache.shape[2], dim,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=hkv, HAS_V=has_v, BD=_pow2(dim))


def _scratch(groups: int, splits: int, rows: int, width: int, device):
    return (torch.empty((groups, splits, rows, width), dtype=torch.float32, device=device),
            torch.empty((groups, splits, rows), dtype=torch.float32, device=device),
            torch.empty((groups, splits, rows), dtype=torch.float32, device=device))


def _merge(po, pm, pl, out, n_split, n_tok, dim, nx, group, n_heads, rows):
    groups = po.shape[0]
    _combine[(groups, rows)](po, pm, pl, out, n_split, n_tok, dim,
                             out.stride(0), out.stride(1), out.stride(2),
                             NX=nx, GROUP=group, H=n_heads, BR=po.shape[2], BD=po.shape[3],
                             BSPLIT=_pow2(n_split))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     q_pos: torch.Tensor, scale: float, window: int = 0,
                     slot_pos: torch.Tensor | None = None, n_split: int | None = None,
                     block_s: int = BLOCK_S, num_warps: int = 4) -> torch.Tensor:
    """q (B, T, H, D), caches (B, Hkv, S, D) already holding the step's keys, q_pos (B, T)
    int positions -> (B, T, H, D) in q's dtype. `window` 0 = unlimited; `slot_pos` (B, S)
    says which position each slot holds, None: slot s holds s (module docstring)."""
    batch, n_tok, n_heads, dim = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous")
    group = n_heads // hkv
    rows = group * n_tok
    br, bd = max(16, _pow2(rows)), max(16, _pow2(dim))
    n_split = n_split or n_splits(cap, batch * hkv, block_s)
    po, pm, pl = _scratch(batch * hkv, n_split, br, bd, q.device)
    q_pos = q_pos.to(torch.int32).contiguous()
    keys = KEYS_FULL if slot_pos is None else KEYS_EXPLICIT
    slot_pos = q_pos if slot_pos is None else slot_pos.to(torch.int32).contiguous()
    _gqa_split[(batch * hkv, n_split)](
        q, k_cache, v_cache, q_pos, slot_pos, po, pm, pl,
        n_tok, cap, dim, window, scale * LOG2E, n_split,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=hkv, G=group, KEYS=keys, IEEE=q.dtype == torch.float32, BR=br, BS=block_s, BD=bd,
        num_warps=num_warps)
    out = torch.empty_like(q)
    _merge(po, pm, pl, out, n_split, n_tok, dim, hkv, group, n_heads, rows)
    return out


@triton.jit
def _mla_split(ql_ptr, qp_ptr, c_ptr, kp_ptr, qpos_ptr, po_ptr, pm_ptr, pl_ptr,
               T, H, S, R, P, sm_scale, n_split,
               sql_b, sql_t, sql_h, sqp_b, sqp_t, sqp_h, sc_b, sc_s, skp_b, skp_s,
               NHB: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr,
               BR: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)  # (sequence, block of BH heads)
    split = tl.program_id(1)
    b = pid // NHB
    r = tl.arange(0, BR)  # r = h * T + t within the head block
    t = r % T
    head = (pid % NHB) * BH + r // T
    rmask = (r < BH * T) & (head < H)
    c_idx = tl.arange(0, BL)
    cmask = c_idx < R
    p_idx = tl.arange(0, BP)
    pmask = p_idx < P
    qpos = tl.load(qpos_ptr + b * T + t, mask=rmask, other=-1)
    ql = tl.load(ql_ptr + b * sql_b + t[:, None] * sql_t + head[:, None] * sql_h + c_idx[None, :],
                 mask=rmask[:, None] & cmask[None, :], other=0.0)
    qp = tl.load(qp_ptr + b * sqp_b + t[:, None] * sqp_t + head[:, None] * sqp_h + p_idx[None, :],
                 mask=rmask[:, None] & pmask[None, :], other=0.0)
    hi = tl.minimum(tl.max(qpos, axis=0) + 1, S)
    start, end = _split_range(0, hi, split, n_split, BS)

    m_i = tl.full((BR,), float("-inf"), tl.float32)
    l_i = tl.zeros((BR,), tl.float32)
    acc = tl.zeros((BR, BL), tl.float32)
    for s0 in range(start, end, BS):
        slots = s0 + tl.arange(0, BS)
        smask = slots < end
        c = tl.load(c_ptr + b * sc_b + slots[:, None] * sc_s + c_idx[None, :],
                    mask=smask[:, None] & cmask[None, :], other=0.0)
        kp = tl.load(kp_ptr + b * skp_b + slots[:, None] * skp_s + p_idx[None, :],
                     mask=smask[:, None] & pmask[None, :], other=0.0)
        if IEEE:
            rope_part = tl.dot(qp, tl.trans(kp), input_precision="ieee")
        else:
            rope_part = tl.dot(qp, tl.trans(kp))
        # the latent is both the key (with the RoPE part) and the value
        m_i, l_i, acc = _attend_block(ql, c, c, rope_part, slots, qpos, smask, 0, sm_scale,
                                      m_i, l_i, acc, IEEE)
    _store_partial(po_ptr, pm_ptr, pl_ptr, pid, split, n_split, r, c_idx, rmask, cmask,
                   m_i, l_i, acc, BR, BL)


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                         k_rope: torch.Tensor, q_pos: torch.Tensor, scale: float,
                         n_split: int | None = None, heads_per_program: int = 16,
                         block_s: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Absorbed MLA decode, one KV head shared by all query heads, in latent space.

    q_latent (B, T, H, R) (q_nope already multiplied by W_UK), q_rope (B, T, H, P);
    c_kv (B, S, R) normalised latents, k_rope (B, S, P) RoPE'd key parts, slot = position;
    q_pos (B, T). score = (q_latent . c + q_rope . k_rope) * scale;
    -> (B, T, H, R): softmax-weighted latents (the caller applies W_UV, then W_O).
    """
    batch, n_tok, n_heads, rank = q_latent.shape
    rope_dim = q_rope.shape[3]
    cap = c_kv.shape[1]
    if c_kv.stride(2) != 1 or k_rope.stride(2) != 1 or q_latent.stride(3) != 1 \
            or q_rope.stride(3) != 1:
        raise ValueError("the feature dimension must be contiguous")
    bh = min(_pow2(n_heads), heads_per_program)
    nhb = triton.cdiv(n_heads, bh)
    rows = bh * n_tok
    br, bl, bp = max(16, _pow2(rows)), max(16, _pow2(rank)), max(16, _pow2(rope_dim))
    n_split = n_split or n_splits(cap, batch * nhb, block_s)
    po, pm, pl = _scratch(batch * nhb, n_split, br, bl, q_latent.device)
    q_pos = q_pos.to(torch.int32).contiguous()
    _mla_split[(batch * nhb, n_split)](
        q_latent, q_rope, c_kv, k_rope, q_pos, po, pm, pl,
        n_tok, n_heads, cap, rank, rope_dim, scale * LOG2E, n_split,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1),
        NHB=nhb, BH=bh, IEEE=q_latent.dtype == torch.float32, BR=br, BS=block_s, BL=bl, BP=bp,
        num_warps=num_warps)
    out = torch.empty_like(q_latent)
    _merge(po, pm, pl, out, n_split, n_tok, rank, nhb, bh, n_heads, rows)
    return out
