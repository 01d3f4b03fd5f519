"""Gradient checkpointing for the torch backends: a function run without recording its
graph, and run again in the backward pass to differentiate it.

torch.utils.checkpoint does the same, but its first call imports torch._dynamo (and,
through it, triton where installed), which stays resident for the rest of the process:
about 150 MiB, more than the activations checkpointing saves on a small model
(BENCHMARKS.md, fine-tuning memory). Here the function's arguments are the only thing
kept; the recomputation replays the same ops on the same values, so the gradients are
those of the recorded graph, bit for bit.
"""

from __future__ import annotations

import torch

from .grad_ops import records


def checkpointed(fn):
    """fn(*tensors) -> one tensor, recomputed in the backward pass; the gradient reaches
    every argument that requires it."""

    def run(*args):
        if records(*args):
            return _Recompute.apply(fn, *args)
        return fn(*args)

    return run


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.save_for_backward(*args)
        return fn(*args)  # autograd records nothing inside forward

    @staticmethod
    def backward(ctx, grad):
        args = [a.detach().requires_grad_(need)
                for a, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            out = ctx.fn(*args)
        wanted = [a for a in args if a.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, *[next(grads) if a.requires_grad else None for a in args])
