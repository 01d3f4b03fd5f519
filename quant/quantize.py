"""Quantizers for the GGML block formats: float rows in, raw blocks out.

The legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float types come from gguf-py's
`gguf.quants.quantize`, which follows ggml's reference rounding. gguf-py has no quantizer
for the K-quants or IQ4_NL; they are written here in vectorised numpy after ggml's reference
algorithms (the ones llama.cpp applies without an importance matrix), so a file we write
has the error of one llama.cpp writes:

- Q2_K, Q4_K, Q5_K (scale and min per sub-block): a weighted least-squares fit of scale and
  min, tried over a sweep of candidate scales around the min/max one, the best kept;
- Q3_K, Q6_K (signed scale, no min): Q6_K sweeps candidate scales and keeps the best
  weighted fit (weights x^2); Q3_K starts from the max-based scale and moves single codes
  while that improves the weighted fit;
- IQ4_NL: a sweep of candidate scales with nearest-codebook-entry codes, weights x^2.

With an importance matrix (per-column weights: `quantize_rows(..., importance)`), these
types follow llama.cpp's weighted paths (ggml's quantize_row_*_impl): element weights
importance * sqrt(sigma * mean(x^2) + x^2) (Q6_K: the importance alone), for Q2_K/Q4_K/Q5_K
a finer sweep and super-scales chosen by the weighted error (make_qp_quants), for Q3_K
make_qx_quants on the sub-blocks and on their scales. Q4_0/Q5_0 (make_qx_quants) and
Q4_1/Q5_1 (make_qkx3_quants) take it too, with the mean of x^2 over the whole row, which
gguf-py's quantizers cannot; Q8_0 ignores it, as ggml's does. The searches' sums run in
ggml's order, so that with an importance matrix the blocks are ggml's byte for byte
(tests/quant/test_quantize_imatrix.py).

The sub-block scales are then quantized against the block's fp16 super-scale(s), and the
codes recomputed with the scales as stored, so the decoder sees the codes that suit them.
Byte layouts come from quant/formats.py; the packing of codes into qs/qh is the inverse of
quant/dequant.py's unpacking.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from diptych.errors import InvalidArgumentError

from .formats import FORMATS, IQ4_NL_CODEBOOK, QK_K, quant_format

T = GGMLQuantizationType
_F = FORMATS

#: A sub-block whose largest magnitude is below this is all zeros (ggml's GROUP_MAX_EPS).
_EPS = np.float32(1e-15)
_CHUNK_ELEMENTS = 1 << 20  # bounds the search's temporaries whatever the tensor size


def _rint(x: np.ndarray) -> np.ndarray:
    """Round half to even, as ggml's nearest_int does."""
    return np.rint(x).astype(np.int32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b != 0, else 0."""
    ok = b != 0
    return np.where(ok, a / np.where(ok, b, 1), 0).astype(np.float32)


def _to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> the fp16 a block stores, and its value back as float32."""
    h = x.astype(np.float16)
    return h, h.astype(np.float32)


# -- scale searches ------------------------------------------------------------------------

def _fit_scale_min(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Per row of x (n, u): codes L in 0..nmax, scale > 0 and min m >= 0 with x ~ scale*L - m,
    minimising sum(w * err) (err squared, or absolute with use_mad).

    Starts from the min/max mapping, then for each candidate scale (nmax + rmin + rdelta*k)
    / (max - min), min the best so far, rounds the codes and solves the weighted least
    squares for scale and min (min clamped to <= 0), keeping the candidate of lowest error.
    Sums run in ggml's order (see `_sequential_sum`).
    """
    lo = np.minimum(x.min(axis=1, keepdims=True), 0)
    hi = x.max(axis=1, keepdims=True)
    flat = hi == lo
    span = np.where(flat, 1, hi - lo).astype(np.float32)

    def error(scale, mn, L):
        diff = scale * L + mn - x
        return _sequential_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = np.float32(nmax) / span
    scale = np.where(flat, 0, 1 / iscale).astype(np.float32)
    L = np.clip(_rint(iscale * (x - lo)), 0, nmax).astype(np.float32)
    best = error(scale, lo, L)
    mn = lo
    sum_w = _sequential_sum(w)
    sum_x = _sequential_sum(w * x)
    for k in range(nstep + 1):
        # the candidates map from the best min so far, not the first one
        span = np.where(hi > mn, hi - mn, 1).astype(np.float32)
        step = np.float32(rmin) + np.float32(rdelta) * np.float32(k)  # float32, as ggml
        iscale = (step + np.float32(nmax)) / span
        La = np.clip(_rint(iscale * (x - mn)), 0, nmax).astype(np.float32)
        wl = w * La
        sum_l = _sequential_sum(wl)
        sum_l2 = _sequential_sum(wl * La)
        sum_xl = _sequential_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, D)
        positive = this_min > 0
        this_scale = np.where(positive, _safe_div(sum_xl, sum_l2), this_scale)
        this_min = np.where(positive, 0, this_min).astype(np.float32)
        cur = error(this_scale, this_min, La)
        better = (D > 0) & (cur < best) & ~flat
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
        L = np.where(better, La, L)
    return scale[:, 0], -mn[:, 0], L.astype(np.uint8)


def _sequential_sum(a):
    """Row sums (n, 1) of a float32 (n, u), added left to right as ggml's C loops add them
    (numpy's sum adds pairwise): the searches compare candidates that often tie (a lone
    outlier fits several codes), and the rounding of the sums decides which one wins."""
    cols = np.ascontiguousarray(a.T, dtype=np.float32)
    acc = cols[0].copy()
    for col in cols[1:]:
        acc += col
    return acc[:, None]


def _signed_max(x):
    """The element of largest magnitude of each row (its sign kept), and that magnitude."""
    i = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, i[:, None], axis=1)
    return mx, np.abs(mx)


def _fit_signed_scale(x, nmax, w=None):
    """ggml's make_qx_quants per row of x (n, u): codes in -nmax..nmax-1 and a signed scale,
    weights w (default x^2); candidate scales -(nmax + k/10)/max for k in -9..9, best
    weighted fit kept."""
    w = x * x if w is None else w
    mx, amax = _signed_max(x)
    zero = amax < _EPS
    mx = np.where(zero, 1, mx)

    def codes(iscale):
        return np.clip(_rint(iscale * x), -nmax, nmax - 1).astype(np.float32)

    def fit(L):
        return _sequential_sum(w * x * L), _sequential_sum(w * L * L)

    L = codes(-np.float32(nmax) / mx)
    sumlx, suml2 = fit(L)
    scale = _safe_div(sumlx, suml2)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        La = codes(-np.float32(nmax + 0.1 * k) / mx)
        slx, sl2 = fit(La)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better, La, L)
        scale = np.where(better, _safe_div(slx, sl2), scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, 0, scale)
    return scale[:, 0], L


def _fit_q3(x, nmax=4):
    """Q3_K's search per row of x (n, 16): codes in -nmax..nmax-1 and a signed scale.

    From the max-based codes, each element's code in turn is moved to the value that best
    fits the others' scale, kept when the weighted fit (weights x^2) improves; five passes.
    """
    w = x * x
    mx, amax = _signed_max(x)
    zero = amax[:, 0] < _EPS
    L = np.clip(_rint(-np.float32(nmax) / np.where(zero[:, None], 1, mx) * x),
                -nmax, nmax - 1).astype(np.float32)
    sumlx = (w * x * L).sum(axis=1)
    suml2 = (w * L * L).sum(axis=1)
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(_rint(_safe_div(xi * sl2, slx)), -nmax, nmax - 1).astype(np.float32)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = ((slx > 0) & (new != li) & (sl22 > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
            L[:, i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(zero, 0, _safe_div(sumlx, suml2))
    return scale, L


def _nearest_codebook(x, codebook):
    """Index of the codebook entry nearest each x (ties to the larger entry)."""
    values = codebook.astype(np.float32)
    hi = np.clip(np.searchsorted(values, x, side="right"), 1, len(values) - 1)
    lower = x - values[hi - 1] < values[hi] - x
    return np.where(lower, hi - 1, hi).astype(np.uint8)


# -- packing: the inverse of quant/dequant.py's unpacking ------------------------------------

def _pack_nibbles(q, group):
    """Codes 0..15 (n, k) -> bytes: each run of `group` bytes holds `group` codes in its low
    nibbles, then the next `group` in its high nibbles."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, group).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _pack_crumbs(q, group):
    """Codes 0..3 (n, k) -> bytes: runs of `group` bytes hold 4 runs of codes, bits 0-1 first."""
    n = q.shape[0]
    q = q.reshape(n, -1, 4, group).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, -1)


def _pack_bit_planes(bits):
    """Bits (n, 256) -> 32 bytes: element 32*i + l is bit i of byte l."""
    n = bits.shape[0]
    planes = bits.reshape(n, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(planes, axis=1)


def _pack_q4_k_scales(sc, m):
    """(sc, m) uint8 (n, 8) in 0..63 -> 12 bytes (the inverse of dequant.q4_k_scales)."""
    lo = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    hi = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    mix = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, hi, mix], axis=1).astype(np.uint8)


def _pack_q3_k_scales(sc):
    """Scales int (n, 16) in -32..31 -> 12 bytes (the inverse of dequant.q3_k_scales)."""
    u = (sc + 32).astype(np.uint8)
    low = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
    high = (u >> 4).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    return np.concatenate([low, np.bitwise_or.reduce(high, axis=1)], axis=1)


def _blocks(fmt, n, **fields):
    """Assemble (n, type_size) blocks from named fields (uint8 arrays or fp16 (n, 1))."""
    out = np.zeros((n, fmt.type_size), dtype=np.uint8)
    for name, value in fields.items():
        field = getattr(fmt, name)
        out[:, field.slice] = np.ascontiguousarray(value).view(np.uint8).reshape(n, -1)
    return out


# -- one function per K-quant / IQ type: x (n_blocks, block_size) -> blocks ------------------

def _super_scale(values, levels):
    """Quantize per-sub-block values >= 0 (n, k) to 0..levels against an fp16 super-scale
    max/levels -> (codes uint8, super-scale fp16 (n, 1), its float value)."""
    top = np.maximum(values.max(axis=1, keepdims=True), 0)
    inv = _safe_div(np.float32(levels), top)
    codes = np.clip(_rint(inv * values), 0, levels).astype(np.uint8)
    h, d = _to_f16(top / np.float32(levels))
    return codes, h, d


def _super_scale_weighted(values, levels, w):
    """ggml's make_qp_quants: per-sub-block values >= 0 (n, k) to 0..levels, the super-scale
    chosen by the weighted error (weights w (n, k)): nine candidate scales around max/levels,
    then single codes moved while the weighted fit improves (five passes), the scale the
    least-squares one for the codes -> (codes uint8, fp16 super-scale (n, 1), its value)."""
    top = values.max(axis=1, keepdims=True)
    zero = top < _EPS
    top = np.where(zero, 1, top).astype(np.float32)
    nmax = np.float32(levels)

    def codes(iscale):
        return np.minimum(nmax, _rint(iscale * values)).astype(np.float32)

    def mse(iscale):
        diff = values - (np.float32(1) / iscale) * codes(iscale)
        return _sequential_sum(w * diff * diff)

    iscale = nmax / top
    best = mse(iscale)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (np.float32(0.1) * np.float32(k) + nmax) / top
        cur = mse(cand)
        iscale = np.where(cur < best, cand, iscale)
        best = np.minimum(cur, best)
    L = codes(iscale)
    sumlx = _sequential_sum(w * values * L)[:, 0]
    suml2 = _sequential_sum(w * L * L)[:, 0]
    for _ in range(5):   # a row that changed nothing changes nothing in a later pass
        for i in range(values.shape[1]):
            wi, xi, li = w[:, i], values[:, i], L[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            new = np.minimum(nmax, _rint(xi * _safe_div(sl2, slx))).astype(np.float32)
            slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
            take = ((slx > 0) & (sl2 > 0) & (new != li)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            L[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx_new, sumlx), np.where(take, sl2_new, suml2)
    d = np.where(zero[:, 0], 0, _safe_div(sumlx, suml2)).astype(np.float32)[:, None]
    h, d = _to_f16(d)
    return np.where(zero, 0, L).astype(np.uint8), h, d


def _recode_affine(x, d, dmin, sc, m, L, nmax, unit):
    """Codes for the scales as stored: round((x + dmin*m) / (d*sc)) where d*sc != 0."""
    n = x.shape[0]
    scale = (d * sc.astype(np.float32))[:, :, None]
    bias = (dmin * m.astype(np.float32))[:, :, None]
    xs = x.reshape(n, -1, unit)
    new = np.clip(_rint((xs + bias) / np.where(scale != 0, scale, 1)), 0, nmax)
    return np.where(scale != 0, new, L.reshape(n, -1, unit)).reshape(n, -1).astype(np.uint8)


def _quantize_affine_k(x, unit, nmax, scale_levels, search, qw=None):
    """Q2_K/Q4_K/Q5_K: per-sub-block (scale, min) search, then the super-block quantization.
    With importance weights qw (n, QK_K) (an imatrix), llama.cpp's weighted path: element
    weights from `_importance_weights`, the search's `imatrix_sweep`, and super-scales by
    the sub-blocks' summed weights."""
    n = x.shape[0]
    xs = x.reshape(-1, unit)
    if qw is None:
        w, sweep = search["weights"](xs), search["sweep"]
    else:
        w, sweep = _importance_weights(x, qw, search["sigma"]).reshape(-1, unit), \
            search["imatrix_sweep"]
    scales, mins, L = _fit_scale_min(xs, w, nmax, *sweep)
    scales, mins = scales.reshape(n, -1), mins.reshape(n, -1)
    if qw is None:
        sc, dh, d = _super_scale(scales, scale_levels)
        m, mh, dmin = _super_scale(mins, scale_levels)
    else:
        sw = _sequential_sum(w).reshape(n, -1)
        sc, dh, d = _super_scale_weighted(scales, scale_levels, sw)
        m, mh, dmin = _super_scale_weighted(mins, scale_levels, sw)
    L = _recode_affine(x, d, dmin, sc, m, L, nmax, unit)
    return sc, m, dh, mh, L


def _importance_weights(x, qw, sigma):
    """ggml's element weights under an imatrix: qw * sqrt(sigma * mean(x^2) + x^2), the
    mean over each row of x (a super-block; a block for IQ4_NL)."""
    sigma2 = np.float32(sigma) * _sequential_sum(x * x) / np.float32(x.shape[1])
    return qw * np.sqrt(sigma2 + x * x)


def _weights_q2(xs):
    return np.abs(xs)


def _weights_rms(xs):
    return np.sqrt((xs * xs).mean(axis=1, keepdims=True)) + np.abs(xs)


def quantize_q2_k(x, qw=None):
    fmt = _F[T.Q2_K]
    sc, m, dh, mh, L = _quantize_affine_k(
        x, fmt.unit, 3, 15, {"weights": _weights_q2, "sweep": (-0.5, 0.1, 15, True),
                             "imatrix_sweep": (-0.9, 0.05, 36, False), "sigma": 1}, qw)
    return _blocks(fmt, x.shape[0], scales=sc | (m << 4), qs=_pack_crumbs(L, 32), d=dh, m=mh)


def quantize_q4_k(x, qw=None):
    fmt = _F[T.Q4_K]
    sc, m, dh, mh, L = _quantize_affine_k(
        x, fmt.unit, 15, 63, {"weights": _weights_rms, "sweep": (-1.0, 0.1, 20, False),
                              "imatrix_sweep": (-0.9, 0.05, 36, False), "sigma": 2}, qw)
    return _blocks(fmt, x.shape[0], d=dh, m=mh, scales=_pack_q4_k_scales(sc, m),
                   qs=_pack_nibbles(L, 32))


def quantize_q5_k(x, qw=None):
    fmt = _F[T.Q5_K]
    sc, m, dh, mh, L = _quantize_affine_k(
        x, fmt.unit, 31, 63, {"weights": _weights_rms, "sweep": (-0.5, 0.1, 15, False),
                              "imatrix_sweep": (-0.9, 0.05, 36, False), "sigma": 2}, qw)
    return _blocks(fmt, x.shape[0], d=dh, m=mh, scales=_pack_q4_k_scales(sc, m),
                   qh=_pack_bit_planes(L >> 4), qs=_pack_nibbles(L & 0x0F, 32))


def _signed_super_scale(scales, levels):
    """Signed sub-block scales (n, k) -> the super-scale's inverse -levels/s, s the scale of
    largest magnitude (0 where all are ~0), its fp16 1/inverse and that value as float."""
    s, amax = _signed_max(scales)
    zero = amax < _EPS
    iscale = np.where(zero, 0, -np.float32(levels) / np.where(zero, 1, s)).astype(np.float32)
    h, d = _to_f16(_safe_div(np.float32(1), iscale))
    return iscale, h, d


def _recode_signed(x, d, sc, L, nmax, unit):
    """Codes (offset by +nmax) for the scales as stored, where d*sc != 0."""
    n = x.shape[0]
    scale = (d * sc.astype(np.float32))[:, :, None]
    new = np.clip(_rint(x.reshape(n, -1, unit) / np.where(scale != 0, scale, 1)), -nmax, nmax - 1)
    return np.where(scale != 0, new + nmax, L.reshape(n, -1, unit)).reshape(n, -1)


def quantize_q3_k(x, qw=None):
    """Without an imatrix ggml's reference search (make_q3_quants, max-based super-scale);
    with one its weighted path: make_qx_quants on the sub-blocks and on their scales."""
    fmt = _F[T.Q3_K]
    n = x.shape[0]
    if qw is None:
        scales, L = _fit_q3(x.reshape(-1, fmt.unit))
        scales = scales.reshape(n, -1)
        iscale, dh, d = _signed_super_scale(scales, 32)
        sc = np.where(iscale != 0, np.clip(_rint(iscale * scales), -32, 31), -32)
    else:
        w = _importance_weights(x, qw, 2).reshape(-1, fmt.unit)
        scales, L = _fit_signed_scale(x.reshape(-1, fmt.unit), 4, w)
        scales = scales.reshape(n, -1)
        d, sc = _fit_signed_scale(scales, 32, _sequential_sum(w).reshape(n, -1))
        dh, d = _to_f16(d[:, None])
        sc = np.where(np.abs(scales).max(axis=1, keepdims=True) < _EPS, -32, sc).astype(int)
    L = _recode_signed(x, d, sc, L + 4, 4, fmt.unit).astype(np.uint8)
    high = L > 3
    return _blocks(fmt, n, qh=_pack_bit_planes(high), qs=_pack_crumbs(L & 0x03, 32),
                   scales=_pack_q3_k_scales(sc), d=dh)


def quantize_q6_k(x, qw=None):
    fmt = _F[T.Q6_K]
    n = x.shape[0]
    # with an imatrix ggml weighs each value by its column's importance alone
    scales, L = _fit_signed_scale(x.reshape(-1, fmt.unit), 32,
                                  None if qw is None else qw.reshape(-1, fmt.unit))
    scales = scales.reshape(n, -1)
    iscale, dh, d = _signed_super_scale(scales, 128)
    sc = np.minimum(127, _rint(iscale * scales)).astype(np.int8)
    L = _recode_signed(x, d, sc, L + 32, 32, fmt.unit).astype(np.uint8)
    L = np.where(iscale != 0, L, 0).astype(np.uint8)  # an all-zero block is all zero bytes
    return _blocks(fmt, n, qs=_pack_nibbles(L & 0x0F, 64), qh=_pack_crumbs(L >> 4, 32),
                   scales=sc, d=dh)


def quantize_iq4_nl(x, qw=None):
    """One scale per 32 values into the 16-entry codebook: candidate scales from the block
    maximum mapped to each codebook end and 7 steps either side, best fit (weights x^2, or
    under an imatrix ggml's importance weights)."""
    fmt = _F[T.IQ4_NL]
    values = IQ4_NL_CODEBOOK.astype(np.float32)
    w = x * x if qw is None else _importance_weights(x, qw, 2)
    mx, amax = _signed_max(x)
    zero = amax < _EPS
    mx = np.where(zero, 1, mx)

    def fit(idx):
        q = values[idx]
        wq = w * q
        return _sequential_sum(wq * x), _sequential_sum(wq * q)

    first = np.float32(1) / (-mx / values[0])  # ggml's 1/d for d = -max/values[0]
    sumqx, sumq2 = fit(_nearest_codebook(x * first, IQ4_NL_CODEBOOK))
    d = _safe_div(sumqx, sumq2)
    best = d * sumqx
    for k in range(-7, 8):
        sqx, sq2 = fit(_nearest_codebook(x * ((k + values[0]) / mx), IQ4_NL_CODEBOOK))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, _safe_div(sqx, sq2), d)
        best = np.where(better, d * sqx, best)
    d = np.where(zero, 0, d).astype(np.float32)
    idx = np.where(zero, 0, _nearest_codebook(x * _safe_div(np.float32(1), d), IQ4_NL_CODEBOOK))
    return _blocks(fmt, x.shape[0], d=d.astype(np.float16), qs=_pack_nibbles(idx, 16))


# -- the legacy types under an importance matrix (ggml's quantize_row_q4_0_impl, ...) ----------

def _legacy_signed(x, w, nmax):
    """Q4_0/Q5_0: make_qx_quants with the importance weights -> (fp16 d (n, 1), codes
    0..2*nmax-1; an all-zero block stores codes 0, as ggml does)."""
    scale, L = _fit_signed_scale(x, nmax, w)
    zero = np.abs(x).max(axis=1, keepdims=True) < _EPS
    return scale.astype(np.float16)[:, None], np.where(zero, 0, L + nmax).astype(np.uint8)


def _legacy_affine(x, w, nmax):
    """Q4_1/Q5_1: make_qkx3_quants with the importance weights -> (fp16 d, fp16 m (n, 1),
    codes 0..nmax); the codes are the search's, not recomputed for the fp16 scales."""
    scale, neg_min, L = _fit_scale_min(x, w, nmax, -0.9, 0.05, 36, False)
    return (scale.astype(np.float16)[:, None], (-neg_min).astype(np.float16)[:, None], L)


def _high_bits(L):
    """Bit 4 of each of a block's 32 codes -> the 4 bytes of qh (element j: bit j)."""
    return np.packbits((L >> 4) & 1, axis=1, bitorder="little")


def _legacy_weighted(values, fmt, qw):
    """Rows (n, n_cols) of a legacy type under column importance qw (n_cols,): element
    weights qw * sqrt(mean(x^2) + x^2), the mean over the whole row (not the block)."""
    w = _importance_weights(values, qw[None, :], 1).reshape(-1, 32)
    x = values.reshape(-1, 32)
    n = x.shape[0]
    if fmt.type == T.Q4_0:
        d, L = _legacy_signed(x, w, 8)
        return _blocks(fmt, n, d=d, qs=_pack_nibbles(L, 16))
    if fmt.type == T.Q5_0:
        d, L = _legacy_signed(x, w, 16)
        return _blocks(fmt, n, d=d, qh=_high_bits(L), qs=_pack_nibbles(L & 0x0F, 16))
    d, m, L = _legacy_affine(x, w, 15 if fmt.type == T.Q4_1 else 31)
    if fmt.type == T.Q4_1:
        return _blocks(fmt, n, d=d, m=m, qs=_pack_nibbles(L, 16))
    return _blocks(fmt, n, d=d, m=m, qh=_high_bits(L), qs=_pack_nibbles(L & 0x0F, 16))


QUANTIZERS = {
    T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k, T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k, T.IQ4_NL: quantize_iq4_nl,
}
_LEGACY_WEIGHTED = frozenset((T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))
#: the types whose quantizer takes importance weights (an imatrix); Q8_0 ignores it, as in ggml
IMATRIX_TYPES = frozenset(QUANTIZERS) | _LEGACY_WEIGHTED
#: gguf-py's quantizers (ggml's reference rounding), for the types it has.
_GGUF_PY_TYPES = frozenset((T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))
assert _GGUF_PY_TYPES | QUANTIZERS.keys() == FORMATS.keys()  # every format we read, we write


def quantize_rows(values: np.ndarray, ggml_type, importance: np.ndarray | None = None
                  ) -> np.ndarray:
    """Float rows (n_rows, n_cols) -> raw rows (n_rows, row_bytes) uint8 in `ggml_type`
    (any type of quant/formats.py; others raise UnsupportedModelError). `importance`
    (n_cols,): each column's mean squared activation (an imatrix), which the IMATRIX_TYPES
    weigh the rounding error by, as llama.cpp does.

    n_cols must be a multiple of the type's block size; the work goes a slice of rows at a
    time, so temporaries stay small.
    """
    fmt = quant_format(ggml_type)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise InvalidArgumentError(f"quantize_rows needs (rows, cols), got shape {values.shape}")
    n_rows, n_cols = values.shape
    if n_cols % fmt.block_size:
        raise InvalidArgumentError(
            f"{fmt.name} needs rows of a multiple of {fmt.block_size} values, not {n_cols}")
    if not np.isfinite(values).all():
        raise InvalidArgumentError(f"cannot quantize to {fmt.name}: the values hold NaN or inf")
    if importance is not None and fmt.type in IMATRIX_TYPES:
        qw = np.asarray(importance, dtype=np.float32).reshape(1, -1, fmt.block_size)
        if qw.shape[1] * fmt.block_size != n_cols:
            raise InvalidArgumentError(f"importance of {qw.size} columns for rows of {n_cols}")
    else:
        qw = None
    if fmt.type in _GGUF_PY_TYPES and qw is None:
        return gguf.quants.quantize(values, fmt.type).view(np.uint8).reshape(n_rows, -1)
    out = np.empty((n_rows, fmt.row_bytes(n_cols)), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    if fmt.type in _LEGACY_WEIGHTED:
        for r in range(0, n_rows, step):
            out[r:r + step] = _legacy_weighted(values[r:r + step], fmt,
                                               qw.reshape(-1)).reshape(-1, out.shape[1])
        return out
    fn = QUANTIZERS[fmt.type]
    for r in range(0, n_rows, step):
        x = values[r:r + step].reshape(-1, fmt.block_size)
        blocks = fn(x) if qw is None else fn(x, np.broadcast_to(
            qw, (len(x) // qw.shape[1], *qw.shape[1:])).reshape(x.shape))
        out[r:r + step] = blocks.reshape(-1, out.shape[1])
    return out


assert all(_F[t].block_size == QK_K for t in QUANTIZERS if t != T.IQ4_NL)
