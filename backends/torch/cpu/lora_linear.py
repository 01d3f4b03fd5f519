"""A quantized linear with its LoRA pairs as one autograd node (the CPU backend's `linear`
when adapters are attached).

y = x W^T (+ bias), then each pair adds scale * (drop(x) A^T) B^T into its rows of y in
place: the scale is folded into the (M, r) product, and the rows are a view of y, so no
(M, N) temporary is made for a pair (padding a pair's output to N columns, scaling it and
adding it cost more than the base matmul on small models: BENCHMARKS.md, training
profile). The backward pass likewise works on views of grad_y and accumulates the pairs'
input gradients into the base's in place. W gets no gradient.
"""

from __future__ import annotations

import torch

from diptych.backends.base import LoRA

from ..grad_ops import records
from .qlinear import QuantLinear


def lora_linear(backend, x: torch.Tensor, w: QuantLinear, bias, pairs: list[LoRA]):
    """x (M, K) -> (M, N): the base and every pair, differentiable in x and the pairs'
    A and B."""
    flat = [t for p in pairs for t in (p.a, p.b)]
    if records(x, *flat):
        return _LoraLinearFn.apply(x, w, bias, pairs, backend, *flat)
    return _forward(backend, x, w, bias, pairs)[0]


def _forward(backend, x, w, bias, pairs):
    """y, each pair's input (x, or x through the pair's dropout) and its
    scale * input A^T (M, r): the backward pass reuses both."""
    y = w.forward(x)
    if bias is not None:
        y += bias
    inputs, scaled = [], []
    for p in pairs:
        xd = backend.dropout(x, p.dropout, p.seed) if p.dropout else x
        xa = torch.mm(xd, p.a.T).mul_(p.scale)
        rows = y if p.rows is None else y[:, p.rows[0]:p.rows[1]]
        rows.addmm_(xa, p.b.T)
        inputs.append(xd)
        scaled.append(xa)
    return y, inputs, scaled


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, pairs, backend, *flat):
        y, inputs, scaled = _forward(backend, x.detach(), w, bias, pairs)
        ctx.w, ctx.pairs, ctx.backend = w, pairs, backend
        # a pair without dropout reads x itself: saved once
        ctx.save_for_backward(x, *[xd if p.dropout else None for p, xd in zip(pairs, inputs)],
                              *scaled, *flat)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *saved = ctx.saved_tensors
        pairs, backend, n = ctx.pairs, ctx.backend, len(ctx.pairs)
        inputs, scaled, flat = saved[:n], saved[n:2 * n], saved[2 * n:]
        gx = ctx.w.grad_input(grad_y) if ctx.needs_input_grad[0] else None
        grads = []
        for j, p in enumerate(pairs):
            a, b = flat[2 * j], flat[2 * j + 1]
            g = grad_y if p.rows is None else grad_y[:, p.rows[0]:p.rows[1]]
            g_xa = torch.mm(g, b).mul_(p.scale)                        # (M, r)
            grads.append(g_xa.T @ (x if inputs[j] is None else inputs[j]))  # A: (r, K)
            grads.append(g.T @ scaled[j])                              # B: (n, r)
            if gx is not None:
                if p.dropout:  # the mask is the seed's: dropout(g_xa A) draws it again
                    gx += backend.dropout(g_xa @ a, p.dropout, p.seed)
                else:
                    gx.addmm_(g_xa, a)
        return (gx, None, None, None, None, *grads)
