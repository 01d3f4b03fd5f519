"""The small per-layer ops of decode and short verify steps as serial numba kernels.

At a few tokens per step each of these ops touches a few thousand floats, and the cost is
torch's: every op is a dispatch, an allocation and often a copy (F.rms_norm alone is six
ops), each a few microseconds, tens of them per layer. Here each op is one call on the
calling thread (no thread-pool fork-join: the work is far too small to split), reading
strided views where torch would copy. The CPU backend takes these kernels for inference
steps of at most MAX_TOKENS tokens in fp32 (`applies`); prefill and training keep torch's
ops.

Numerics: fp32 throughout, the same formulas as TorchBackend's ops; sums may be
reassociated (vectorized), so results agree with torch's to a few fp32 ulps.
"""

from __future__ import annotations

import numpy as np
import torch

from .cached_njit import cached_njit
from .fast_exp import FAST_MATH, exp_nonpositive
from .step_tape import copy, run

# The widest step (batch x tokens) these kernels take: decode, batched decode rows and
# speculative verify widths. Prefill keeps torch's (multi-threaded) ops.
MAX_TOKENS = 32


def applies(x: torch.Tensor, tokens: int) -> bool:
    """Whether a step of `tokens` tokens (batch x positions) with activations x takes these
    kernels: fp32 activations under inference mode (the engine's forwards). Training keeps
    torch's ops in all its passes, so that a checkpointed layer's recompute repeats its
    forward bit for bit."""
    return (tokens <= MAX_TOKENS and x.dtype == torch.float32
            and torch.is_inference_mode_enabled())


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (detach, a torch op, only where needed)."""
    return x.detach().numpy() if x.requires_grad else x.numpy()


def _rows(x: torch.Tensor) -> np.ndarray:
    """x as a C-contiguous 2-D numpy array of its last axis: a view where there is one, else
    a copy that a taped step makes again (several positions of a slice of a fused
    projection). Contiguous rows at every width keep the kernels to one compiled layout: a
    strided one vectorizes a row's sums in another order, and a position's output would
    then depend on the step's width (speculative verify steps must give one-position
    steps' bits). The ops below reshape in numpy and hand torch arrays already in their
    final shape: a torch view of a fresh tensor costs more than the kernel's dispatch."""
    a = as_numpy(x)
    rows = a.reshape(-1, a.shape[-1])
    if a.size and not (rows.flags.c_contiguous and np.may_share_memory(rows, a)):
        rows = copy(a).reshape(rows.shape)
    return rows


@cached_njit(fastmath=FAST_MATH, error_model="numpy")
def _rms_norm_rows(x, w, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        xr, o = x[r], out[r]
        s = np.float32(0.0)
        for c in range(n):
            s += xr[c] * xr[c]
        inv = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
        for c in range(n):
            o[c] = xr[c] * inv * w[c]


@cached_njit(fastmath=FAST_MATH, error_model="numpy")
def _add_rms_norm_rows(x, residual, w, eps, total, out):
    """total = x + residual; out = rms_norm(total) * w, in one pass over the rows."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        xr, rr, t, o = x[r], residual[r], total[r], out[r]
        s = np.float32(0.0)
        for c in range(n):
            v = xr[c] + rr[c]
            t[c] = v
            s += v * v
        inv = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
        for c in range(n):
            o[c] = t[c] * inv * w[c]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    rows = _rows(x)
    out = np.empty(x.shape, np.float32)
    run(_rms_norm_rows, rows, w.numpy(), np.float32(eps), out.reshape(rows.shape),
        reads=(rows,), writes=(out,))
    return torch.from_numpy(out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, res = _rows(x), _rows(residual)
    total = np.empty(x.shape, np.float32)
    out = np.empty(x.shape, np.float32)
    run(_add_rms_norm_rows, rows, res, w.numpy(), np.float32(eps), total.reshape(rows.shape),
        out.reshape(rows.shape), reads=(rows, res), writes=(total, out))
    return torch.from_numpy(total), torch.from_numpy(out)


@cached_njit(fastmath=FAST_MATH, error_model="numpy")
def _rope_heads(x, positions, cos, sin, dim, out):
    """out[b, t, h] = x[b, t, h] with its first `dim` channels turned NeoX-style (channel i
    paired with i + dim/2) by row positions[b, t] of the (positions, dim/2) cos/sin tables;
    the channels past `dim` copied."""
    half = dim // 2
    n_b, n_t, n_h, d_h = x.shape
    for b in range(n_b):
        for t in range(n_t):
            c, s = cos[positions[b, t]], sin[positions[b, t]]
            for h in range(n_h):
                xr, o = x[b, t, h], out[b, t, h]
                for i in range(half):
                    lo, hi = xr[i], xr[i + half]
                    o[i] = lo * c[i] - hi * s[i]
                    o[i + half] = hi * c[i] + lo * s[i]
                for i in range(dim, d_h):
                    o[i] = xr[i]


def rope(x: torch.Tensor, positions: np.ndarray, tables, dim: int) -> torch.Tensor:
    """x (B, T, H, Dh) turned at positions (B, T) (int64) by the cos/sin tables (P, dim/2)
    that tables(positions) gives (on a taped step, each replay asks for its positions)."""
    xn = as_numpy(x)
    out = np.empty(x.shape, np.float32)
    run(_rope, xn, positions, tables, dim, out, reads=(xn, positions), writes=(out,))
    return torch.from_numpy(out)


def _rope(x, positions, tables, dim, out):
    _rope_heads(x, positions, *tables(positions), dim, out)


@cached_njit(fastmath=FAST_MATH, error_model="numpy")
def _silu_glu_rows(gate, up, out):
    """out = silu(gate) * up; sigmoid from e = exp(-|g|): 1 / (1 + e) for g >= 0, else
    e / (1 + e) (no overflow either side)."""
    for r in range(gate.shape[0]):
        g, u, o = gate[r], up[r], out[r]
        for c in range(g.shape[0]):
            x = g[c]
            e = exp_nonpositive(-abs(x))
            sig = (np.float32(1.0) if x >= 0 else e) / (np.float32(1.0) + e)
            o[c] = x * sig * u[c]


@cached_njit(fastmath=FAST_MATH, error_model="numpy")
def _gelu_tanh_glu_rows(gate, up, out):
    """out = gelu_tanh(gate) * up; tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|)."""
    k = np.float32(0.7978845608028654)  # sqrt(2 / pi)
    for r in range(gate.shape[0]):
        g, u, o = gate[r], up[r], out[r]
        for c in range(g.shape[0]):
            x = g[c]
            y = k * (x + np.float32(0.044715) * x * x * x)
            e = exp_nonpositive(np.float32(-2.0) * abs(y))
            t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
            o[c] = np.float32(0.5) * x * (np.float32(1.0) + (t if y >= 0 else -t)) * u[c]


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, act "silu" or "gelu_tanh" (as TorchBackend.glu)."""
    rows, up_rows = _rows(gate), _rows(up)
    out = np.empty(gate.shape, np.float32)
    run(_silu_glu_rows if act == "silu" else _gelu_tanh_glu_rows, rows, up_rows,
        out.reshape(rows.shape), reads=(rows, up_rows), writes=(out,))
    return torch.from_numpy(out)
