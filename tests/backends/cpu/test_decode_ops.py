"""The CPU backend's small-step kernels (decode_ops.py) against TorchBackend's torch ops,
and which steps take them.

Both sides compute in fp32 with the same formulas; the kernels may reassociate sums and use
their own exp polynomial (within 3 ulp), so they agree to a few ulps: 2e-6 relative, and
2e-6 of the largest output absolute (GeGLU's tails are differences of nearly equal
numbers in both). A wrong axis, a missing weight, a pair of RoPE channels
swapped or a sign moves outputs by orders of magnitude more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diptych.backends import select
from diptych.backends.base import RopeSpec
from diptych.backends.torch.backend import TorchBackend
from diptych.backends.torch.cpu import decode_ops


def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def be():
    return select("torch", "cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 3, 896), (1, 1, 9, 64)])
def test_rms_norms_match_torch(be, shape):
    g = _gen(len(shape))
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3
    x = wide[..., :shape[-1]]  # a strided view, as a slice of a fused projection
    residual = torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    with torch.inference_mode():
        _close(be.rms_norm(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6))
        total, normed = be.add_rms_norm(x, residual, w, 1e-5)
        assert torch.equal(total, x + residual)
        _close(normed, F.rms_norm(x + residual, (shape[-1],), w, 1e-5))


@pytest.mark.parametrize("width", [256, 576, 2048])
def test_a_position_gives_the_same_bits_at_every_step_width(be, width):
    """A slice of a fused projection (Gemma's k of its qkv, gate of gate_up) is strided at
    several positions and contiguous at one: each position's norm and GLU rows are the same
    bits either way (a verify step computes what one-position steps compute)."""
    g = _gen(width)
    fused = torch.randn(1, 8, 3 * width, generator=g)
    w = torch.randn(width, generator=g)
    with torch.inference_mode():
        for t in range(8):
            many, one = fused[:, :, :width], fused[:, t:t + 1, :width]
            up_many, up_one = fused[:, :, width:2 * width], fused[:, t:t + 1, width:2 * width]
            assert torch.equal(be.rms_norm(many, w, 1e-6)[:, t], be.rms_norm(one, w, 1e-6)[:, 0])
            assert torch.equal(be.glu(many, up_many, "gelu_tanh")[:, t],
                               be.glu(one, up_one, "gelu_tanh")[:, 0])


@pytest.mark.parametrize("head_dim,dim", [(64, 64), (128, 64), (80, 32)])
def test_rope_matches_torch(be, head_dim, dim):
    """Full and partial rotary dims (the channels past `dim` pass through), per-row
    positions, and a scaled spec (mscale, explicit frequencies)."""
    g = _gen(head_dim + dim)
    specs = [RopeSpec(dim, 10000.0),
             RopeSpec(dim, 1e6, inv_freq=tuple(torch.rand(dim // 2, generator=g).tolist()),
                      mscale=1.3)]
    for spec in specs:
        x = torch.randn(2, 3, 5, head_dim, generator=g)
        positions = torch.tensor([[0, 1, 2], [700, 701, 4095]])
        with torch.inference_mode():
            out = be.rope(x, positions, spec)
            ref = TorchBackend.rope(select("torch", "cpu"), x, positions, spec)
        _close(out, ref)


def test_rope_tables_cover_the_positions_reached():
    """The cos/sin tables start small and grow as positions go past them, each time to at
    least the position asked for, with the values of the float64 formula."""
    be = select("torch", "cpu")
    spec = RopeSpec(64, 10000.0, mscale=1.1)
    assert be._cos_sin(spec, 3)[0].shape[0] < 1024
    for n in (257, 700, 5000):
        cos, sin = be._cos_sin(spec, n)
        assert cos.shape[0] >= n and sin.shape == cos.shape
    angle = np.arange(cos.shape[0])[:, None] * spec.frequencies()[None]
    np.testing.assert_allclose(cos.numpy(), np.cos(angle) * 1.1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin.numpy(), np.sin(angle) * 1.1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_matches_torch(be, act):
    g = _gen(7)
    gate_up = torch.randn(3, 1, 2 * 1536, generator=g) * 6
    gate_up[0, 0, :6] = torch.tensor([100.0, -100.0, 0.0, -0.0, 88.0, -88.0])
    gate, up = gate_up[..., :1536], gate_up[..., 1536:]
    with torch.inference_mode():
        out = be.glu(gate, up, act)
    ref = (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up
    assert torch.isfinite(out).all()
    _close(out, ref)


def test_small_inference_steps_take_the_kernels_and_the_rest_takes_torch(be, monkeypatch):
    """Up to MAX_TOKENS tokens under inference mode (the engine's forwards) go to the
    kernels; wider steps (prefill) and training's passes (its no-grad forward before a
    recompute, and the recorded one: the gradient reaches x) go to torch's ops."""
    calls = []
    for name in ("rms_norm", "add_rms_norm", "rope", "glu"):
        kernel = getattr(decode_ops, name)
        monkeypatch.setattr(decode_ops, name,
                            lambda *a, k=kernel, n=name: calls.append(n) or k(*a))
    w, spec = torch.rand(64) + 0.5, RopeSpec(64, 10000.0)
    widest = decode_ops.MAX_TOKENS
    modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
             "grad": torch.enable_grad}
    for batch, n, mode, taken in ((1, 1, "inference", True), (2, widest // 2, "inference", True),
                                  (1, widest + 1, "inference", False), (1, 1, "no_grad", False),
                                  (1, 1, "grad", False)):
        calls.clear()
        x = torch.randn(batch, n, 64, requires_grad=mode == "grad")
        with modes[mode]():
            heads = x.reshape(batch, n, 2, 32).repeat(1, 1, 1, 2)
            positions = torch.arange(n).expand(batch, n)
            outs = [be.rms_norm(x, w, 1e-5), *be.add_rms_norm(x, x * 2, w, 1e-5),
                    be.rope(heads, positions, spec), be.glu(x, x * 3, "silu")]
        assert calls == (["rms_norm", "add_rms_norm", "rope", "glu"] if taken else [])
        if mode == "grad":
            sum(o.sum() for o in outs).backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rows", [1, 3, 30])
def test_small_steps_linear_gives_forward_s_outputs(be, rows):
    """CpuBackend.linear on a decode step goes to the kernel with numpy arrays
    (QuantLinear.small_rows), bias added; its outputs are `forward`'s bit for bit, and a
    width DISPATCH sends to the fp32 tiles (Q3_K from 24 rows) takes `forward` itself."""
    from gguf import GGMLQuantizationType as T

    from diptych.quant import QuantTensor
    from diptych.quant.quantize import quantize_rows

    g = np.random.default_rng(rows)
    w = g.standard_normal((96, 256)).astype(np.float32)
    lin = be.prepare(QuantTensor("w", T.Q3_K, (96, 256), quantize_rows(w, T.Q3_K)))
    x = torch.from_numpy(g.standard_normal((1, rows, 256)).astype(np.float32))
    bias = torch.from_numpy(g.standard_normal(96).astype(np.float32))
    with torch.inference_mode():
        out = be.linear(x, lin, bias)
        ref = lin.forward(x.reshape(rows, 256)) + bias
    assert out.shape == (1, rows, 96)
    assert torch.equal(out.reshape(rows, 96), ref)
    assert (lin.small_rows(x.numpy().reshape(rows, 256)) is None) == (rows >= 24)
