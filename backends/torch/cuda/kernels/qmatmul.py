"""Quantized matmul kernels reading the planes of layout.py and dequantizing in registers.

`_tile` is the one dequantizer: it returns a (BN, BK) fp32 tile of weight rows in element
order, with quant/dequant.py's formula per type. On top of it:
  _gemv   M <= GEMV_MAX_M rows of x (decode, speculative verification): x tile times the
          weight tile, summed along K in fp32; each weight byte is read once for all M rows.
  _gemv_id  the GEMV of stacked routed experts, each row of x times the expert its id
          picks (ggml's mul_mat_id): MoE decode without reading the ids on the host.
  _gemm   tl.dot on (BM, BK) x tiles and dequantized (BN, BK) weight tiles, fp32 accumulate
          (prefill chunks up to DEQUANT_MM_MIN_M rows).
  _dequant  writes dequantized rows (optionally gathered by id): the embedding lookup, the
          large-M path that dequantizes row tiles into a buffer for a cuBLAS matmul, and the
          input gradient (training) grad_y @ W on the same tiles.
Every load and store is masked (rows past N, columns past K, rows of x past M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from diptych.quant.formats import FORMATS

from .layout import KERNEL_TYPES

# ggml type ids, as constexpr for the kernels' type switches
Q4_0 = tl.constexpr(int(QT.Q4_0))
Q4_1 = tl.constexpr(int(QT.Q4_1))
Q5_0 = tl.constexpr(int(QT.Q5_0))
Q5_1 = tl.constexpr(int(QT.Q5_1))
Q8_0 = tl.constexpr(int(QT.Q8_0))
IQ4_NL = tl.constexpr(int(QT.IQ4_NL))
Q4_K = tl.constexpr(int(QT.Q4_K))
Q5_K = tl.constexpr(int(QT.Q5_K))
Q6_K = tl.constexpr(int(QT.Q6_K))
# layout constants of quant/formats.py, as constexpr for the kernels
QK = tl.constexpr(FORMATS[QT.Q4_0].block_size)  # the legacy types' block (one scale each)
QK_K = tl.constexpr(FORMATS[QT.Q4_K].block_size)
K_SCALE_BYTES = tl.constexpr(FORMATS[QT.Q4_K].scales.size)  # Q4_K/Q5_K packed scales
Q6_K_UNIT = tl.constexpr(FORMATS[QT.Q6_K].unit)
Q4_0_OFFSET = tl.constexpr(FORMATS[QT.Q4_0].code_offset)
Q5_0_OFFSET = tl.constexpr(FORMATS[QT.Q5_0].code_offset)
Q6_K_OFFSET = tl.constexpr(FORMATS[QT.Q6_K].code_offset)

# Path thresholds on M (rows of x). Not yet measured on a GPU: benchmarks/bench_cuda.py
# --crossover measures them (GEMV vs GEMM at small M, fused GEMM vs dequantize + cuBLAS).
GEMV_MAX_M = 8
DEQUANT_MM_MIN_M = 256
DEQUANT_TILE_ELEMENTS = 1 << 25  # rows dequantized per cuBLAS call: 64 MiB of bf16


@triton.jit
def _tile(q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr, rows, rmask, k0, K,
          TYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Dequantized weights W[rows, k0:k0+BK] as fp32 (BN, BK); zero where masked."""
    G: tl.constexpr = Q6_K_UNIT if TYPE == Q6_K else QK
    NG: tl.constexpr = BK // G
    KQ: tl.constexpr = TYPE == Q4_K or TYPE == Q5_K or TYPE == Q6_K
    rows = rows.to(tl.int64)[:, None]
    rmask = rmask[:, None]
    if TYPE == Q8_0:
        ks = k0 + tl.arange(0, BK)
        code = tl.load(q_ptr + rows * K + ks[None, :], mask=rmask & (ks < K)[None, :], other=0)
        code = code.to(tl.int32)
    else:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        b = tl.load(q_ptr + rows * (K // 2) + kb[None, :], mask=rmask & (kb < K // 2)[None, :],
                    other=0).to(tl.int32)
        code = tl.join(b & 15, b >> 4).reshape(BN, BK)
        if TYPE == Q5_0 or TYPE == Q5_1 or TYPE == Q5_K:
            kh = k0 // 8 + tl.arange(0, BK // 8)
            h = tl.load(qh_ptr + rows * (K // 8) + kh[None, :],
                        mask=rmask & (kh < K // 8)[None, :], other=0).to(tl.int32)
            h = (h[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            code = code | (h.reshape(BN, BK) << 4)
        if TYPE == Q6_K:
            kh = k0 // 4 + tl.arange(0, BK // 4)
            h = tl.load(qh_ptr + rows * (K // 4) + kh[None, :],
                        mask=rmask & (kh < K // 4)[None, :], other=0).to(tl.int32)
            h = (h[:, :, None] >> (2 * tl.arange(0, 4))[None, None, :]) & 3
            code = code | (h.reshape(BN, BK) << 4)

    # per-group scale (and bias) for the NG groups of this tile
    g = k0 // G + tl.arange(0, NG)
    gmask = rmask & (g < K // G)[None, :]
    if KQ:
        SUB: tl.constexpr = QK_K // G
        blk = g // SUB
        n_blk = K // QK_K
    else:
        blk = g
        n_blk = K // QK
    d = tl.load(d_ptr + rows * n_blk + blk[None, :], mask=gmask, other=0.0).to(tl.float32)
    if TYPE == Q4_K or TYPE == Q5_K:
        j = g % (QK_K // G)
        base = sc_ptr + rows * (n_blk * K_SCALE_BYTES) + (blk * K_SCALE_BYTES)[None, :]
        lo = j < 4
        a = tl.load(base + tl.where(lo, j, j + 4)[None, :], mask=gmask, other=0).to(tl.int32)
        b2 = tl.load(base + tl.where(lo, j + 4, j - 4)[None, :], mask=gmask, other=0).to(tl.int32)
        c = tl.load(base + j[None, :], mask=gmask, other=0).to(tl.int32)
        sc = tl.where(lo[None, :], a & 63, (a & 15) | ((b2 >> 6) << 4))
        mn = tl.where(lo[None, :], b2 & 63, (a >> 4) | ((c >> 6) << 4))
        dmin = tl.load(m_ptr + rows * n_blk + blk[None, :], mask=gmask, other=0.0).to(tl.float32)
        scale = d * sc.to(tl.float32)
        bias = -(dmin * mn.to(tl.float32))
    elif TYPE == Q6_K:
        sc = tl.load(sc_ptr + rows * (K // G) + g[None, :], mask=gmask, other=0).to(tl.float32)
        scale = d * sc
    else:
        scale = d

    code = code.reshape(BN, NG, G)
    if TYPE == Q4_0:
        w = scale[:, :, None] * (code + Q4_0_OFFSET).to(tl.float32)
    elif TYPE == Q5_0:
        w = scale[:, :, None] * (code + Q5_0_OFFSET).to(tl.float32)
    elif TYPE == Q6_K:
        w = scale[:, :, None] * (code + Q6_K_OFFSET).to(tl.float32)
    elif TYPE == Q8_0:
        w = code.to(tl.float32) * scale[:, :, None]
    elif TYPE == IQ4_NL:
        w = scale[:, :, None] * tl.load(lut_ptr + code, mask=code < 16, other=0.0)
    elif TYPE == Q4_1 or TYPE == Q5_1:
        mn = tl.load(m_ptr + rows * n_blk + blk[None, :], mask=gmask, other=0.0).to(tl.float32)
        w = scale[:, :, None] * code.to(tl.float32) + mn[:, :, None]
    else:  # Q4_K, Q5_K
        w = scale[:, :, None] * code.to(tl.float32) + bias[:, :, None]
    return w.reshape(BN, BK)


@triton.jit
def _gemv(x_ptr, y_ptr, bias_ptr, q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr,
          M, N, K, stride_xm, stride_ym,
          TYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    ms = tl.arange(0, BM)
    # (BN, BM): rows of W along dim 0, as in the weight tile, so no layout change per step
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = _tile(q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr, rows, rmask, k0, K, TYPE, BN, BK)
        ks = k0 + tl.arange(0, BK)
        for mi in tl.static_range(BM):  # each row of x against the same weight tile
            x = tl.load(x_ptr + mi * stride_xm + ks, mask=(ks < K) & (mi < M),
                        other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)
            acc += tl.where(ms[None, :] == mi, part[:, None], 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + ms[None, :] * stride_ym + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(ms < M)[None, :] & rmask[:, None])


@triton.jit
def _gemm(x_ptr, y_ptr, bias_ptr, q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr,
          M, N, K, stride_xm, stride_ym,
          TYPE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    mmask = ms < M
    rmask = rows < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=mmask[:, None] & (ks < K)[None, :], other=0.0)
        w = _tile(q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr, rows, rmask, k0, K, TYPE, BN, BK)
        # the weight tile is rounded to x's dtype (bf16 on CUDA) for the tensor cores
        if IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms.to(tl.int64)[:, None] * stride_ym + rows[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _gemv_id(x_ptr, y_ptr, ids_ptr, q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr,
             N, K, X_PER_ID, stride_xm, stride_ym,
             TYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[p] = W_e @ x[p // X_PER_ID] with e = ids[p], W_e rows e*N..e*N+N-1 of a stacked
    weight: one pair p and one row block per program (ggml's mul_mat_id)."""
    p = tl.program_id(1)
    local = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = local < N
    rows = tl.load(ids_ptr + p).to(tl.int64) * N + local
    x_row = x_ptr + (p // X_PER_ID).to(tl.int64) * stride_xm
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = _tile(q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr, rows, rmask, k0, K, TYPE, BN, BK)
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + p.to(tl.int64) * stride_ym + local, acc.to(y_ptr.dtype.element_ty),
             mask=rmask)


@triton.jit
def _dequant(out_ptr, ids_ptr, q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr,
             R, row0, K, stride_out,
             TYPE: tl.constexpr, GATHER: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[i] = W[ids[i]] (GATHER) or W[row0 + i], for i < R."""
    i = tl.program_id(0) * BN + tl.arange(0, BN)
    imask = i < R
    if GATHER:
        rows = tl.load(ids_ptr + i, mask=imask, other=0)
    else:
        rows = row0 + i
    k0 = tl.program_id(1) * BK
    w = _tile(q_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, lut_ptr, rows, imask, k0, K, TYPE, BN, BK)
    ks = k0 + tl.arange(0, BK)
    tl.store(out_ptr + i.to(tl.int64)[:, None] * stride_out + ks[None, :],
             w.to(out_ptr.dtype.element_ty), mask=imask[:, None] & (ks < K)[None, :])


# -- launchers -----------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _plane_args(w) -> list:
    """The six plane pointers of a QuantWeight; absent planes pass `q` (never read)."""
    p = w.planes
    return [p["q"], p.get("qh", p["q"]), p["d"], p.get("m", p["d"]), p.get("sc", p["q"]), w.lut]


def _block_k(w, bk: int) -> int:
    """A tile width that is a whole number of scale groups, at most the padded row."""
    group = KERNEL_TYPES[w.ggml_type].group
    return max(32, group, min(bk, _pow2(w.in_features)))


def gemv(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, block_n: int = 16,
         block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """x (M, K) with M <= GEMV_MAX_M -> (M, N), fp32 accumulation."""
    m, k = x.shape
    n = w.out_features
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = _pow2(m)
    bk = _block_k(w, block_k)
    _gemv[(triton.cdiv(n, block_n),)](
        x, y, bias if bias is not None else y, *_plane_args(w), m, n, k, x.stride(0),
        y.stride(0), TYPE=int(w.ggml_type), HAS_BIAS=bias is not None, BM=bm, BN=block_n,
        BK=bk, num_warps=num_warps)
    return y


def gemv_id(x: torch.Tensor, w, ids: torch.Tensor, n_rows: int, *, block_n: int = 16,
            block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """Stacked weight W (experts of n_rows rows each), ids (P,) expert per pair, x (M, K)
    with P a multiple of M -> (P, n_rows): pair p multiplies expert ids[p] by x[p // (P/M)]."""
    m, k = x.shape
    n_pairs = ids.numel()
    x = x.contiguous()
    y = torch.empty((n_pairs, n_rows), dtype=x.dtype, device=x.device)
    _gemv_id[(triton.cdiv(n_rows, block_n), n_pairs)](
        x, y, ids.reshape(-1), *_plane_args(w), n_rows, k, n_pairs // m, x.stride(0),
        y.stride(0), TYPE=int(w.ggml_type), BN=block_n, BK=_block_k(w, block_k),
        num_warps=num_warps)
    return y


def gemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, block_m: int = 64,
         block_n: int = 64, block_k: int = 64, num_warps: int = 4,
         num_stages: int = 3) -> torch.Tensor:
    """x (M, K) -> (M, N) with tl.dot on dequantized weight tiles."""
    m, k = x.shape
    n = w.out_features
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = max(16, min(block_m, _pow2(m)))
    bn = max(16, min(block_n, _pow2(n)))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemm[grid](
        x, y, bias if bias is not None else y, *_plane_args(w), m, n, k, x.stride(0),
        y.stride(0), TYPE=int(w.ggml_type), HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=_block_k(w, block_k),
        num_warps=num_warps, num_stages=num_stages)
    return y


def dequantize(w, dtype: torch.dtype, ids: torch.Tensor | None = None, row0: int = 0,
               n_rows: int | None = None, out: torch.Tensor | None = None, *,
               block_n: int = 16, block_k: int = 256) -> torch.Tensor:
    """Rows of W as `dtype`: W[ids] when ids is given, else W[row0:row0+n_rows]."""
    k = w.in_features
    r = ids.numel() if ids is not None else (w.out_features - row0 if n_rows is None else n_rows)
    if out is None:
        out = torch.empty((r, k), dtype=dtype, device=w.planes["q"].device)
    bk = _block_k(w, block_k)
    grid = (triton.cdiv(r, block_n), triton.cdiv(k, bk))
    _dequant[grid](out, ids if ids is not None else out, *_plane_args(w), r, row0, k,
                   out.stride(0), TYPE=int(w.ggml_type), GATHER=ids is not None,
                   BN=block_n, BK=bk)
    return out


def _row_tiles(w, dtype: torch.dtype, device):
    """(first row, rows, W[rows] dequantized) over W in row tiles, through one reused buffer."""
    n, k = w.out_features, w.in_features
    step = max(16, min(n, DEQUANT_TILE_ELEMENTS // k))
    buf = torch.empty((step, k), dtype=dtype, device=device)
    for r0 in range(0, n, step):
        rn = min(step, n - r0)
        yield r0, rn, dequantize(w, dtype, row0=r0, n_rows=rn, out=buf[:rn])


def dequant_matmul(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large M: dequantize row tiles of W into one reused buffer, multiply with torch (cuBLAS)."""
    y = torch.empty((x.shape[0], w.out_features), dtype=x.dtype, device=x.device)
    for r0, rn, tile in _row_tiles(w, x.dtype, x.device):
        y[:, r0:r0 + rn] = x @ tile.t()
    if bias is not None:
        y += bias.to(y.dtype)
    return y


def grad_input(grad_y: torch.Tensor, w) -> torch.Tensor:
    """grad_y (M, N) @ W -> (M, K): the input gradient of a frozen quantized linear."""
    gx = torch.zeros((grad_y.shape[0], w.in_features), dtype=torch.float32,
                     device=grad_y.device)
    for r0, rn, tile in _row_tiles(w, grad_y.dtype, grad_y.device):
        gx += (grad_y[:, r0:r0 + rn] @ tile).float()
    return gx.to(grad_y.dtype)


def qmatmul(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T (+ bias): the path by M (see the thresholds above)."""
    m = x.shape[0]
    if m <= GEMV_MAX_M:
        return gemv(x, w, bias)
    if m < DEQUANT_MM_MIN_M:
        return gemm(x, w, bias)
    return dequant_matmul(x, w, bias)
