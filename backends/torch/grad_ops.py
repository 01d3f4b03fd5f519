"""RMSNorm, rotary embedding and SwiGLU as single autograd nodes. RMSNorm and rotary
embedding serve every pass, so that a recomputed layer replays its first pass's arithmetic
exactly; SwiGLU's forward is silu(gate) * up, as the composed op's.

Composed from torch ops, each of these allocates four to eight (tokens, width) arrays
between its forward and backward passes (squares, products, a concatenation and its
slices' zero-filled gradients). A training step makes hundreds of them, and each large
block is fresh memory from the system, so their page faults cost as much as their
arithmetic (BENCHMARKS.md, fine-tuning). Here each pass allocates its output alone and
works in place on it.
"""

from __future__ import annotations

import torch


def records(*tensors) -> bool:
    """Whether autograd records an op on these tensors (training): then the
    differentiable paths run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * w over the last axis; differentiable in x (w is frozen)."""
    return _RMSNorm.apply(x, w, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + swap_halves(x) * sin over x's whole last axis, cos and sin in the
    half-split layout (sin's first half negated) and broadcast against x."""
    return _Rope.apply(x, cos, sin)


def silu_glu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :F]) * x[..., F:] for a stacked gate and up projection x (..., 2F); its
    gradient is one (..., 2F) array, not a zero-filled one per half."""
    return _SiluGlu.apply(x)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_() / x.shape[-1]
    return mean_square.add_(eps).rsqrt_()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last axis, keepdim, without an (…, D) product array."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, w, rstd)
        return torch.mul(x, rstd).mul_(w)

    @staticmethod
    def backward(ctx, grad):
        # y = x r w with r = (mean x^2 + eps)^-1/2: dx = r (g w) - x r^3 mean(g w x)
        x, w, rstd = ctx.saved_tensors
        gx = torch.mul(grad, w)
        coef = _rowdot(gx, x).mul_(rstd.pow(3) / x.shape[-1])
        return gx.mul_(rstd).addcmul_(x, coef, value=-1), None, None


class _SiluGlu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ff = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :ff]).mul_(x[..., ff:])

    @staticmethod
    def backward(ctx, grad):
        # with s = sigmoid(gate): d up = grad silu(gate), d gate = grad up (silu + s (1 - silu))
        (x,) = ctx.saved_tensors
        ff = x.shape[-1] // 2
        gate, up = x[..., :ff], x[..., ff:]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        d_gate, d_up = out[..., :ff], out[..., ff:]
        torch.sigmoid(gate, out=d_gate)
        torch.mul(gate, d_gate, out=d_up)                       # silu(gate)
        d_gate.addcmul_(d_up, d_gate, value=-1).add_(d_up).mul_(up).mul_(grad)
        d_up.mul_(grad)
        return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1), None, None


def _rotate(x, cos, sin, sign: int):
    """x * cos + swap_halves(x) * sin (sign 1) or its transpose (sign -1: the gradient,
    where each half takes the other half's sine)."""
    half = x.shape[-1] // 2
    out = torch.mul(x, cos)
    lo, hi = (sin[..., :half], sin[..., half:]) if sign > 0 else (sin[..., half:],
                                                                   sin[..., :half])
    out[..., :half].addcmul_(x[..., half:], lo)
    out[..., half:].addcmul_(x[..., :half], hi)
    return out
