"""The torch backend on the CPU: quantized linears and embeddings from qlinear.py (numba
kernels over the repacked GGUF blocks), the other ops from TorchBackend, fp32 activations,
and one thread budget for torch and numba."""

from __future__ import annotations

import torch

from diptych.quant import QuantTensor

from ..backend import TorchBackend
from .kernel_cache import set_compile_listener
from .qlinear import QuantLinear
from .threads import configure_threads


class CpuBackend(TorchBackend):
    def __init__(self):
        configure_threads()
        super().__init__("cpu", torch.float32)

    def on_compile(self, listener) -> None:
        set_compile_listener(listener)

    def prepare(self, qt: QuantTensor) -> QuantLinear:
        return QuantLinear.from_quant_tensor(qt)

    def embed(self, table: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        return table.embed_rows(ids.reshape(-1)).reshape(batch, n, -1)

    def linear(self, x, w: QuantLinear, bias=None, adapter=None):
        if self.linear_observer is not None:
            self.linear_observer(x, w)
        lead = x.shape[:-1]
        y = w.forward(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y += bias
        return self.add_adapter(x, y.reshape(*lead, y.shape[-1]), adapter)
