"""Row-wise kernels: RMSNorm (optionally fused with the residual add) and NeoX RoPE.

Both keep fp32 inside and read positions from a device array, so they run unchanged in a
captured decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, D, eps, sx, sr, sy, ss,
              RESIDUAL: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    mask = d < D
    h = tl.load(x_ptr + row * sx + d, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        h += tl.load(res_ptr + row * sr + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * ss + d, h.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + d, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim. With `residual`: returns (x + residual, norm(x + residual)),
    the sum rounded to x's dtype once, as an unfused add would."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n, dim = x2.shape
    y = torch.empty((n, dim), dtype=x.dtype, device=x.device)
    r2 = residual.reshape(-1, dim).contiguous() if residual is not None else x2
    s = torch.empty_like(y) if residual is not None else y
    _rms_norm[(n,)](x2, r2, w, y, s, dim, eps, x2.stride(0), r2.stride(0), y.stride(0),
                    s.stride(0), RESIDUAL=residual is not None, BD=_pow2(dim),
                    num_warps=4 if dim <= 2048 else 8)
    if residual is None:
        return y.reshape(shape)
    return s.reshape(shape), y.reshape(shape)


@triton.jit
def _rope(x_ptr, y_ptr, pos_ptr, inv_freq_ptr, T, H, DH, HALF, mscale,
          sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, BH: tl.constexpr, BDH: tl.constexpr):
    """One (sequence, token): every head's first 2*HALF channels rotated, the rest copied."""
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    h = tl.arange(0, BH)
    c = tl.arange(0, BDH)
    mask = (h < H)[:, None] & (c < DH)[None, :]
    rot = c < 2 * HALF
    first = c < HALF
    partner = tl.where(first, c + HALF, c - HALF)
    f = tl.where(first, c, c - HALF)
    pos = tl.load(pos_ptr + pid).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + f, mask=rot, other=0.0)  # fp32, as transformers does
    cos = tl.where(rot, tl.cos(angle) * mscale, 1.0)
    sin = tl.where(rot, tl.sin(angle) * mscale, 0.0)
    sin = tl.where(first, -sin, sin)
    base = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h
    x = tl.load(base + c[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    y = x * cos[None, :] + xp * sin[None, :]
    tl.store(y_ptr + b * sy_b + t * sy_t + h[:, None] * sy_h + c[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
         mscale: float = 1.0) -> torch.Tensor:
    """x (B, T, H, Dh), positions (B, T); inv_freq (rot_dim / 2,) fp32 frequencies (any
    scaling scheme folds into them), mscale multiplies cos and sin (YaRN's attention factor).
    Angles are pos * inv_freq in fp32, cos/sin in-kernel: no table to size or index."""
    batch, n_tok, n_heads, dh = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    y = torch.empty((batch, n_tok, n_heads, dh), dtype=x.dtype, device=x.device)
    pos = positions.reshape(-1).contiguous()
    _rope[(batch * n_tok,)](x, y, pos, inv_freq, n_tok, n_heads, dh, inv_freq.shape[0], mscale,
                            x.stride(0), x.stride(1), x.stride(2),
                            y.stride(0), y.stride(1), y.stride(2),
                            BH=_pow2(n_heads), BDH=_pow2(dh))
    return y
