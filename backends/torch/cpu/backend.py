"""The torch backend on the CPU: quantized linears and embeddings from qlinear.py (numba
kernels over the repacked GGUF blocks), the other ops from TorchBackend, fp32 activations,
an fp16 KV cache, and one thread budget for torch and numba."""

from __future__ import annotations

import os

import torch

from diptych.errors import InvalidArgumentError
from diptych.quant import QuantTensor

from ..backend import TorchBackend
from . import decode_attention
from .kernel_cache import set_compile_listener
from .llama_rounding import RoundingQuantLinear
from .lora_linear import lora_linear
from .qlinear import QuantLinear
from .threads import configure_threads


# $DIPTYCH_KV_TYPE -> what the KV cache stores. fp16 by default, as llama.cpp keeps it: half
# the memory of fp32, and attention reads it back in fp32; f32 computes exactly in fp32.
KV_TYPES = {"f16": torch.float16, "f32": torch.float32}


def kv_type_from_env() -> torch.dtype:
    name = os.environ.get("DIPTYCH_KV_TYPE", "f16").strip().lower()
    if name not in KV_TYPES:
        raise InvalidArgumentError(f"DIPTYCH_KV_TYPE={name!r}: expected one of "
                                   f"{', '.join(KV_TYPES)}")
    return KV_TYPES[name]


class CpuBackend(TorchBackend):
    def __init__(self):
        configure_threads()
        super().__init__("cpu", torch.float32, kv_type_from_env())
        self._linear_type = QuantLinear

    def use_llama_cpp_rounding(self) -> None:
        self._linear_type = RoundingQuantLinear

    def on_compile(self, listener) -> None:
        set_compile_listener(listener)

    def prepare(self, qt: QuantTensor) -> QuantLinear:
        return self._linear_type.from_quant_tensor(qt)

    def attend_cache(self, q, kc, vc, spec, view, scale):
        """Decode widths over a long cache read the fp16 cache directly
        (decode_attention.py); other steps (short caches, prefill, autograd) take
        TorchBackend's SDPA over an fp32 copy."""
        if decode_attention.supports(q, kc, view.n_keys):
            return decode_attention.attend(q, kc, vc, spec, view, scale)
        return super().attend_cache(q, kc, vc, spec, view, scale)

    def embed(self, table: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        return table.embed_rows(ids.reshape(-1)).reshape(batch, n, -1)

    def linear(self, x, w: QuantLinear, bias=None, adapter=None):
        if self.linear_observer is not None:
            self.linear_observer(x, w)
        lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if adapter:
            y = lora_linear(self, flat, w, bias, adapter)
        else:
            y = w.forward(flat)
            if bias is not None:
                y += bias
        return y.reshape(*lead, y.shape[-1])
