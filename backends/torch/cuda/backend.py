"""The CUDA backend: TorchBackend's graph ops on CUDA tensors, with Triton kernels for the
quantized linears, the embedding, RMSNorm, RoPE and decode attention, and CUDA-graph decode.

Weights: the nine kernel types stay quantized as the planes of kernels/layout.py (exactly
the GGUF bytes). F32/F16/BF16 weights are stored in the activation dtype. Any other GGUF
type (Q2_K, Q3_K) has no kernel: that one weight is dequantized to the activation dtype at
load, with a warning naming it: the slower, larger path is never silent and never applied
to the whole model.

Attention: the step's K/V are written into the cache by position (device array), then up to
DECODE_MAX_T queries use the split-K decode kernels (full cache, ring-buffer window, MLA in
latent space); longer chunks (prefill, eager) use torch's SDPA over the cache.

Training (autograd recording, an input requiring grad): the linears run the same kernels with
grad_x = grad_y @ dequant(W) as their backward; RMSNorm, RoPE and attention (cache write
included) run as plain torch ops, which autograd records.

Activations are bf16 on CUDA (fp16 overflows in Gemma). `CudaBackend(device="cpu")` runs
every kernel under TRITON_INTERPRET=1 on CPU tensors (fp32 or fp16): the CI wiring check.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from diptych.backends.base import LayerCacheSpec, RopeSpec, Step, window_mask
from diptych.quant import QuantTensor

from diptych.backends.torch.backend import TorchBackend, TorchKV
from .kernels import attention as attn
from .kernels import norm, qmatmul
from .kernels.layout import KERNEL_TYPES
from .kernels.weight import QuantWeight

log = logging.getLogger(__name__)

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
DECODE_MAX_T = 8  # queries per step that use the decode attention kernels


@dataclass
class DenseWeight:
    """A float weight on the device (a float GGUF type, or a type without a kernel)."""

    name: str
    source_type: QT
    w: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    @property
    def layout(self) -> str:
        how = "as stored" if self.source_type in FLOAT_TYPES else "dequantized at load (no kernel)"
        return f"dense {str(self.w.dtype).removeprefix('torch.')} ({self.source_type.name}, {how})"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class CudaBackend(TorchBackend):
    name = "torch"

    def __init__(self, device: str = "cuda", dtype: torch.dtype | None = None):
        # TorchBackend.__init__ is CPU-only (threads, fp32): not called.
        dev = torch.device(device)
        if dev.type != "cuda" and not interpreting():
            raise ValueError("CudaBackend runs on CUDA; on the CPU only under TRITON_INTERPRET=1")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = str(dev)
        self.dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        self._inv_freq: dict[RopeSpec, torch.Tensor] = {}

    def describe(self) -> str:
        if self.device.startswith("cuda"):
            return f"torch ({self.device}: {torch.cuda.get_device_name(self.device)}, Triton)"
        return f"torch ({self.device}, Triton interpreter)"

    # -- weights -------------------------------------------------------------------------
    def prepare(self, qt: QuantTensor):
        if qt.ggml_type in KERNEL_TYPES and len(qt.shape) == 2:
            return QuantWeight.from_quant_tensor(qt, self.device)
        if qt.ggml_type not in FLOAT_TYPES:
            log.warning("%s: no CUDA kernel for %s; dequantized to %s at load (%.1f MiB "
                        "instead of %.1f)", qt.name, qt.type_name, self.dtype,
                        qt.n_elements * self.dtype.itemsize / 2**20, qt.nbytes / 2**20)
        values = torch.from_numpy(qt.dequantize())
        return DenseWeight(qt.name, qt.ggml_type, values.to(self.device, self.dtype))

    def prepare_vector(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.device)

    def weight_bytes(self, w) -> int:
        return w.nbytes

    def weight_layout(self, w) -> str:
        return w.layout

    # -- graph ops -----------------------------------------------------------------------
    def embed(self, table, ids):
        batch, n = ids.shape
        flat = ids.reshape(-1)
        if isinstance(table, DenseWeight):
            rows = table.w[flat]
        else:
            rows = qmatmul.dequantize(table, self.dtype, ids=flat)
        return rows.reshape(batch, n, -1)

    def linear(self, x, w, bias=None):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if isinstance(w, DenseWeight):
            y = F.linear(x2, w.w, None if bias is None else bias.to(x.dtype))
        elif _grad(x2):
            y = _QuantLinearFn.apply(x2, w)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = qmatmul.qmatmul(x2, w, bias)
        return y.reshape(*lead, y.shape[-1])

    def rms_norm(self, x, w, eps):
        if _grad(x, w):
            return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)
        return norm.rms_norm(x, w, eps)

    def add_rms_norm(self, x, residual, w, eps):
        """(x + residual, rms_norm(x + residual)) in one pass."""
        if _grad(x, residual, w):
            h = x + residual
            return h, self.rms_norm(h, w, eps)
        return norm.rms_norm(x, w, eps, residual=residual)

    def _frequencies(self, spec: RopeSpec) -> torch.Tensor:
        inv = self._inv_freq.get(spec)
        if inv is None:
            inv = torch.from_numpy(spec.frequencies()).to(self.device, torch.float32)
            self._inv_freq[spec] = inv
        return inv

    def rope(self, x, positions, spec: RopeSpec):
        inv = self._frequencies(spec)
        if not _grad(x):
            return norm.rope(x, positions, inv, spec.mscale)
        angle = positions[:, :, None, None].float() * inv  # what the kernel computes
        cos = (angle.cos() * spec.mscale).to(x.dtype)
        sin = (angle.sin() * spec.mscale).to(x.dtype)
        half = spec.dim // 2
        x1, x2, rest = x[..., :half], x[..., half:spec.dim], x[..., spec.dim:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    def attention(self, q, k, v, kv: TorchKV, layer, step: Step, scale):
        spec = kv.specs[layer]
        kc, vc = kv.k[layer], kv.v[layer]
        ring = spec.window > 0
        n = q.shape[1]
        if _grad(q, k, v):  # training: torch writes and SDPA, which autograd records
            start, end = step.start, step.start + n
            where = torch.arange(start, end, device=kc.device) % spec.slots
            kc[:, :, where] = k.transpose(1, 2).to(kc.dtype)
            if vc is not None:
                vc[:, :, where] = v.transpose(1, 2).to(vc.dtype)
            return self._chunk_attention(q, kc, vc, spec, step, scale)
        attn.write_kv(k, v, kc, vc, step.positions, ring=ring)
        if n > DECODE_MAX_T:
            return self._chunk_attention(q, kc, vc, spec, step, scale)
        if spec.v_from_k:
            r = spec.v_from_k
            out = attn.mla_decode_attention(q[..., :r], q[..., r:], kc[:, 0, :, :r],
                                            kc[:, 0, :, r:], step.positions, scale)
        else:
            out = attn.decode_attention(q, kc, vc, step.positions, scale, window=spec.window,
                                        keys=attn.KEYS_RING if ring else attn.KEYS_FULL)
        return out.reshape(q.shape[0], n, -1)

    def _chunk_attention(self, q, kc, vc, spec: LayerCacheSpec, step: Step, scale):
        """Prefill chunks (eager): SDPA over the cache, masks from the step's host ints."""
        start, n = step.start, step.n_tokens
        end = start + n
        n_keys = spec.slots if end > spec.slots else end
        keys = kc[:, :, :n_keys]
        values = vc[:, :, :n_keys] if vc is not None else keys[..., :spec.v_from_k]
        mask, causal = None, False
        if spec.window and end > spec.window:
            mask = torch.from_numpy(window_mask(spec, start, end, n_keys)).to(q.device)
        elif start == 0:  # no mask tensor: lets SDPA pick its flash kernel
            causal = True
        else:
            mask = torch.arange(end, device=q.device)[None, :] <= \
                torch.arange(start, end, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape[0], n, -1)

    def take_positions(self, x, index: np.ndarray):
        if len(index) == x.shape[1]:
            return x
        return x[:, torch.as_tensor(np.asarray(index, dtype=np.int64), device=x.device)]

    # -- cache, transfers, capture -------------------------------------------------------
    def ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)

    def compile_step(self, fn):
        """The decode step as a CUDA graph (GraphStep); unchanged off CUDA."""
        if not self.device.startswith("cuda"):
            return fn
        return GraphStep(fn, torch.device(self.device))


def _grad(*tensors) -> bool:
    """Whether autograd records this op: then the differentiable torch path runs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _QuantLinearFn(torch.autograd.Function):
    """y = x @ W.T with W quantized and frozen: grad_x = grad_y @ dequant(W), no grad_W."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return qmatmul.qmatmul(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        return qmatmul.grad_input(grad_y, ctx.w), None


class GraphStep:
    """Calls fn(*args) through a CUDA graph captured at the first call per input signature.

    Tensor arguments are the static input slots: each call copies its values into them and
    replays the graph. Everything else fn touches (weights, the KV cache) must be the same
    persistent tensors on every call, and non-tensor arguments must not change what fn
    computes on this backend (they are frozen at capture: CudaBackend's decode reads
    positions from the device array, never Step.start). The returned tensor is the graph's
    static output: overwritten by the next call, so consume (sample) it first.
    """

    def __init__(self, fn, device: torch.device):
        self.fn = fn
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a.__class__
                    for a in args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        graph, slots, out = entry
        for slot, a in zip(slots, args):
            if isinstance(a, torch.Tensor):
                slot.copy_(a, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, args):
        """(graph, input slots, output), or None when fn cannot be captured."""
        slots = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compiles the kernels; rewrites the same K/V slots
            self.fn(*slots)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*slots)
        except RuntimeError as e:  # a host sync inside fn, e.g. MoE routing on the host
            log.warning("decode step not capturable, running it eagerly: %s",
                        str(e).splitlines()[0])
            return None
        return graph, slots, out
