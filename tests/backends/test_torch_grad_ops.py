"""The torch backends' single-node training ops against the torch compositions they replace:
same values, and gradients that torch.autograd.gradcheck confirms numerically."""

import pytest
import torch

from diptych.backends.torch import grad_ops
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.log_likelihood import token_log_likelihood


def _x(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


def test_rms_norm_is_torch_s_and_its_gradient_is_exact():
    x, w = _x(2, 5, 3, 8), torch.randn(8, dtype=torch.float64)
    want = torch.nn.functional.rms_norm(x, (8,), w, 1e-5)
    torch.testing.assert_close(grad_ops.rms_norm(x, w, 1e-5), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: grad_ops.rms_norm(t, w, 1e-5), (x,))


def test_rope_is_the_half_split_rotation_and_its_gradient_is_exact():
    x = _x(2, 5, 3, 8)
    cos, sin = torch.randn(2, 5, 1, 8, dtype=torch.float64), torch.randn(2, 5, 1, 8,
                                                                          dtype=torch.float64)
    want = x * cos + torch.cat((x[..., 4:], x[..., :4]), -1) * sin
    torch.testing.assert_close(grad_ops.rope(x, cos, sin), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: grad_ops.rope(t, cos, sin), (x,))


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_token_log_likelihood_is_the_masked_log_softmax_sum_with_its_gradient(softcap):
    gen = torch.Generator().manual_seed(1)
    n, d, vocab = 7, 6, 11
    w = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    weights = torch.tensor([1, 0, 1, 1, 0.5, 1, 0], dtype=torch.float64)
    be = CpuBackend()
    be.linear = lambda x, m: x @ m.T  # the fp64 reference's head, on both sides

    def want(h):
        logits = h @ w.T
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        picked = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        return (picked * weights).sum()

    h = _x(n, d, seed=2)
    got = token_log_likelihood(be, h, w, targets, weights, softcap)
    torch.testing.assert_close(got, want(h), rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(3.0 * got, h)
    (g_want,) = torch.autograd.grad(3.0 * want(h), h)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(token_log_likelihood(be, h, w, targets, weights, softcap),
                                   want(h), rtol=1e-12, atol=1e-12)


def test_silu_glu_is_the_composed_op_bit_for_bit_and_its_gradient_is_exact():
    x = _x(2, 5, 12)
    want = torch.nn.functional.silu(x[..., :6]) * x[..., 6:]
    assert torch.equal(grad_ops.silu_glu(x), want)   # a recomputed layer replays it exactly
    assert torch.autograd.gradcheck(grad_ops.silu_glu, (x,))
