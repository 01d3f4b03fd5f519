"""The training loss of one piece of positions on the torch backends, with its gradient
computed in the forward pass (`Backend.token_log_likelihood`).

The loss is a scalar, so its gradient in h is known up to the incoming scale as soon as the
logits are: d/dlogits of sum_i w_i log p_i(t_i) is w_i (onehot(t_i) - p_i). Computing it
there runs the output head twice (logits, then grad_h = g W) where recomputing the logits
in the backward pass runs it three times, and every (n, vocab) step (max, exp, normalise,
scale) works in place on the one logits array: no log-softmax copy, no zero-filled gather
gradient. Only grad_h (n, D) is kept for the backward pass.
"""

from __future__ import annotations

import torch

from .grad_ops import records


def token_log_likelihood(backend, h, w, targets, weights, softcap: float):
    """`Backend.token_log_likelihood` (always holding no (n, vocab) array afterwards)."""
    if not records(h):
        return _value_and_grad(backend, h, w, targets, weights, softcap, grad=False)[0]
    return _TokenLogLikelihood.apply(h, backend, w, targets, weights, softcap)


def _value_and_grad(backend, h, w, targets, weights, softcap, grad: bool):
    """The loss (a 0-d float32 tensor) and, with `grad`, its gradient in h."""
    x = h.detach().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        logits = backend.linear(x, w)  # a linear keeps x, not its output: z may change it
    z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    idx = targets.reshape(-1, 1)
    wts = weights.reshape(-1, 1).to(z.dtype)
    if softcap:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    peak = z.amax(dim=1, keepdim=True)
    picked = z.gather(1, idx) - peak
    p = z.sub_(peak).exp_()
    total = p.sum(dim=1, keepdim=True)
    value = ((picked - total.log()) * wts).sum()
    if not grad:
        return value, None
    g = p.div_(total).mul_(-wts)  # w (onehot - p), in place of the logits
    g.scatter_add_(1, idx, wts)
    if softcap:
        g.mul_(1 - t * t)
    (grad_h,) = torch.autograd.grad(logits, x, g.to(logits.dtype))
    return value, grad_h


class _TokenLogLikelihood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, backend, w, targets, weights, softcap):
        value, grad_h = _value_and_grad(backend, h, w, targets, weights, softcap, grad=True)
        ctx.save_for_backward(grad_h)
        return value

    @staticmethod
    def backward(ctx, grad):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad.to(grad_h.dtype), None, None, None, None, None
