"""The torch backend on the CPU: quantized linears and embeddings from qlinear.py (numba
kernels over the repacked GGUF blocks), the other ops from TorchBackend, fp32 activations,
an fp16 KV cache, and one thread budget for torch and numba."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from diptych.backends.base import StepKeys
from diptych.errors import InvalidArgumentError
from diptych.quant import QuantTensor

from ..backend import TorchBackend, TorchKV
from . import (chunked_topk, decode_attention, decode_ops, int8_activations, qlinear,
               step_tape)
from .embedding_table import EmbeddingTable
from .kernel_cache import set_compile_listener
from .kernel_source import I8_TYPES
from .llama_rounding import RoundingQuantLinear
from .lora_linear import lora_linear
from .qlinear import QuantLinear
from .step_tape import StepTape
from .switches import switched_on
from .threads import GOVERNOR, configure_threads


# $DIPTYCH_KV_TYPE -> what the KV cache stores. fp16 by default, as llama.cpp keeps it: half
# the memory of fp32, and attention reads it back in fp32; f32 computes exactly in fp32.
KV_TYPES = {"f16": torch.float16, "f32": torch.float32}


def kv_type_from_env() -> torch.dtype:
    name = os.environ.get("DIPTYCH_KV_TYPE", "f16").strip().lower()
    if name not in KV_TYPES:
        raise InvalidArgumentError(f"DIPTYCH_KV_TYPE={name!r}: expected one of "
                                   f"{', '.join(KV_TYPES)}")
    return KV_TYPES[name]


class CpuKV(TorchKV):
    """TorchKV with each layer's buffers also as the numpy arrays the decode attention
    kernels read and write (views of the same memory; restore() copies in place)."""

    def __init__(self, specs, batch, dtype, device):
        super().__init__(specs, batch, dtype, device)
        self.stored = [(decode_attention.stored(k), None if v is None else decode_attention.stored(v))
                       for k, v in zip(self.k, self.v)]


class CpuBackend(TorchBackend):
    prepared_layout = f"cpu-rows{qlinear.R}"   # repack.py's row-interleaved blocks

    def __init__(self):
        configure_threads()
        super().__init__("cpu", torch.float32, kv_type_from_env())
        self._linear_type = QuantLinear
        self._int8 = False  # numerics "fast": int8 activations where the CPU has them
        self._np_rope: dict = {}  # per RoPE spec: its cos and sin tables as numpy

    @contextmanager
    def inference(self):
        """torch's inference mode, each forward's wall and CPU time told to the thread
        governor (threads.ThreadGovernor)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            yield
        GOVERNOR.record(time.perf_counter() - wall, time.thread_time() - cpu)

    def use_llama_cpp_rounding(self) -> None:
        self._linear_type = RoundingQuantLinear
        self._int8 = False  # its inputs come rounded: the products must be exact

    def use_fast_products(self) -> None:
        self._int8 = int8_activations.ENABLED

    def compile_step(self, fn):
        """Fixed-width steps (decode, speculative verification) replayed from a tape of
        their kernel calls (step_tape.StepTape); $DIPTYCH_CPU_TAPE=0 runs every step
        through the graph."""
        if not switched_on("DIPTYCH_CPU_TAPE"):
            return fn
        return StepTape(fn)

    def speed_key(self) -> str:
        products = ("llama.cpp's rounding" if self._linear_type is RoundingQuantLinear
                    else "int8 activations" if self._int8 else "fp32 activations")
        return f"{self.describe()}, {torch.get_num_threads()} threads, {products}"

    def bf16_native(self) -> bool:
        return qlinear.BF16_NATIVE

    def training_products(self, dtype: str):
        if dtype == "bf16":
            return qlinear.bf16_products()
        return super().training_products(dtype)

    def on_first_use(self, listener) -> None:
        super().on_first_use(listener)
        set_compile_listener(listener)

    def prepare(self, qt: QuantTensor) -> QuantLinear:
        return self._prepared(self._linear_type.from_quant_tensor(qt))

    def prepare_stacked(self, name: str, parts: list[QuantTensor]) -> QuantLinear:
        return self._prepared(self._linear_type.from_parts(name, parts))

    def prepare_table(self, qt: QuantTensor) -> EmbeddingTable:
        return EmbeddingTable(qt)   # rows read from the file's blocks: no repacked copy

    def _prepared(self, w: QuantLinear) -> QuantLinear:
        w.int8 = self._int8 and w.ggml_type in I8_TYPES
        return w

    def attention(self, q, k, v, kv, layer, step, scale):
        """Decode widths write and read the fp16 cache directly (decode_attention.py);
        other steps (prefill) write with torch indexing and take TorchBackend's SDPA over an
        fp32 copy, as do StepKeys over the step's own keys."""
        if isinstance(kv, StepKeys) or not decode_attention.supports(q, kv.k[layer]):
            step_tape.untaped()  # the cache written by torch indexing
            return super().attention(q, k, v, kv, layer, step, scale)
        keys, values = kv.stored[layer]
        view = step.views[layer]
        decode_attention.store(k, v, keys, values, view.slots)
        return decode_attention.attend(q, keys, values, kv.specs[layer], step.positions,
                                       view.key_pos, scale)

    def alloc_kv(self, specs, batch) -> "CpuKV":
        return CpuKV(specs, batch, self.kv_dtype, self.device)

    def topk(self, x, k):
        if k == 1 and x.dim() == 2:
            if x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
                # numpy's argmax is vectorised, torch's index reductions are not (a 262k
                # row: BENCHMARKS.md); both give the first of equal maxima, or the first NaN
                ids = torch.from_numpy(x.numpy().argmax(-1)[:, None])
                return torch.gather(x, 1, ids), ids
            return torch.max(x, -1, keepdim=True)
        if _chunked(x, k):
            return chunked_topk.topk(x, k)
        return super().topk(x, k)

    def scatter_topk(self, x, idx, values, k):
        if _chunked(x, k):
            return chunked_topk.topk(x, k, idx, values)
        return super().scatter_topk(x, idx, values, k)

    # small steps' per-layer ops: one serial kernel each instead of several torch ops
    def rms_norm(self, x, w, eps):
        if decode_ops.applies(x, _tokens(x)):
            return decode_ops.rms_norm(x, w, eps)
        return super().rms_norm(x, w, eps)

    def add_rms_norm(self, x, residual, w, eps):
        if decode_ops.applies(x, _tokens(x)) and residual.dtype == torch.float32:
            return decode_ops.add_rms_norm(x, residual, w, eps)
        return super().add_rms_norm(x, residual, w, eps)

    def rope(self, x, positions, spec):
        if not decode_ops.applies(x, positions.numel()):
            return super().rope(x, positions, spec)
        return decode_ops.rope(x, positions.numpy(), partial(self._rope_tables, spec),
                               spec.dim)

    def _rope_tables(self, spec, positions: np.ndarray):
        """numpy cos/sin tables of `spec` that reach positions' largest."""
        tables = self._np_rope.get(spec)
        top = positions.item() if positions.size == 1 else positions.max()  # item: decode's
        if tables is None or tables[0].shape[0] <= top:
            cos, sin = self._cos_sin(spec, int(top) + 1)
            tables = self._np_rope[spec] = (cos.numpy(), sin.numpy())
        return tables

    def glu(self, gate, up, act):
        if decode_ops.applies(gate, _tokens(gate)):
            return decode_ops.glu(gate, up, act)
        return super().glu(gate, up, act)

    def embed(self, table: QuantLinear | EmbeddingTable, ids: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
        batch, n = ids.shape
        rows = table.embed_rows(ids.reshape(-1))
        if scale != 1.0:
            if torch.is_inference_mode_enabled():  # numpy in place, as a taped step replays
                rn = rows.numpy()
                step_tape.run(np.multiply, rn, np.float32(scale), rn, reads=(rn,))
            else:
                rows = rows * scale
        return rows.reshape(batch, n, -1)

    def linear(self, x, w: QuantLinear, bias=None, adapter=None):
        if self.linear_observer is not None:
            self.linear_observer(x, w)
        elif not adapter and decode_ops.applies(x, _tokens(x)):
            # a decode step: straight to the kernel, numpy in and out
            xn = decode_ops.as_numpy(x)
            y = w.small_rows(np.ascontiguousarray(xn.reshape(-1, xn.shape[-1])))
            if y is not None:
                if bias is not None:
                    step_tape.run(np.add, y, bias.numpy(), y, reads=(y,))
                return torch.from_numpy(y.reshape(*xn.shape[:-1], y.shape[-1]))
        step_tape.untaped()  # LoRA pairs and the bias add into the kernel's output in place
        lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if adapter:
            y = lora_linear(self, flat, w, bias, adapter)
        else:
            y = w.forward(flat)
            if bias is not None:
                y += bias
        return y.reshape(*lead, y.shape[-1])


def _tokens(x: torch.Tensor) -> int:
    """Tokens of graph activations (B, T, D), or of per-head ones (B, T, H, Dh)."""
    return x.shape[0] * x.shape[1] if x.dim() >= 3 else x.shape[0]


def _chunked(x: torch.Tensor, k: int) -> bool:
    """Whether a top-k of x goes through chunked_topk's kernel (wide float32 rows)."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
            and not x.requires_grad and chunked_topk.takes(x.shape[-1], k))
