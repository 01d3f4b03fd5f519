"""The torch backend on the CPU: quantized linears and embeddings from qlinear.py (numba
kernels over the repacked GGUF blocks), the other ops from TorchBackend, fp32 activations,
and one thread budget for torch and numba."""

from __future__ import annotations

import ctypes
import functools

import torch

from diptych.quant import QuantTensor

from ..backend import TorchBackend
from .qlinear import QuantLinear
from .threads import configure_threads


@functools.cache
def _return_freed_buffers() -> None:
    """glibc keeps large freed blocks in its heaps (its mmap threshold rises with each big
    block freed, and threads get arenas of their own), so a training step's transient
    activations, tiles and gradients pile up as resident memory. A fixed 1 MiB mmap
    threshold and two arenas hand them back to the system when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)         # M_ARENA_MAX
    except (OSError, AttributeError):
        pass                        # not glibc: its allocator, its rules


class CpuBackend(TorchBackend):
    def __init__(self):
        configure_threads()
        super().__init__("cpu", torch.float32)

    def value_and_grad(self, fn, params):
        _return_freed_buffers()
        return super().value_and_grad(fn, params)

    def prepare(self, qt: QuantTensor) -> QuantLinear:
        return QuantLinear.from_quant_tensor(qt)

    def embed(self, table: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        return table.embed_rows(ids.reshape(-1)).reshape(batch, n, -1)

    def linear(self, x, w: QuantLinear, bias=None, adapter=None):
        lead = x.shape[:-1]
        y = w.forward(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y += bias
        return self.add_adapter(x, y.reshape(*lead, y.shape[-1]), adapter)
