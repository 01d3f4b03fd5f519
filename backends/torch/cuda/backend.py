"""The CUDA backend: TorchBackend's graph ops on CUDA tensors, with Triton kernels for the
quantized linears, the embedding, RMSNorm, RoPE and decode attention, and CUDA-graph decode.

Weights: the nine kernel types stay quantized as the planes of kernels/layout.py (exactly
the GGUF bytes). F32/F16/BF16 weights are stored in the activation dtype. Any other GGUF
type (Q2_K, Q3_K) has no kernel: that one weight is dequantized to the activation dtype at
load, with a warning naming it: the slower, larger path is never silent and never applied
to the whole model.
Routed experts of a kernel type are stacked (QuantExperts), so MoE decode picks each token's
experts by id on the device.

Attention: the step's K/V are written into the slots the runtime chose (device arrays), then
up to DECODE_MAX_T queries use the split-K decode kernels (full cache, ring-buffer window,
MLA in latent space); longer chunks (prefill, eager) use torch's SDPA over the cache.

Training (autograd recording, an input requiring grad; LoRA fine-tuning, issue 13, builds on
it): the linears run the same kernels with grad_x = grad_y @ dequant(W) as their backward;
RMSNorm, RoPE and attention (cache write included) run TorchBackend's torch ops, which
autograd records.

Activations are bf16 on CUDA (fp16 overflows in Gemma). `CudaBackend(device="cpu")` runs
every kernel under TRITON_INTERPRET=1 on CPU tensors (fp32 or fp16): the CI wiring check.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from diptych.backends.base import RopeSpec, Step, StepKeys
from diptych.errors import BackendUnavailableError
from diptych.quant import QuantTensor

from ..backend import TorchBackend, TorchKV
from ..grad_ops import records
from .graph_step import GraphStep
from .kernels import attention as attn
from .kernels import norm, qmatmul
from .kernels.layout import KERNEL_TYPES
from .kernels.weight import QuantExperts, QuantWeight

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
    def __init__(self, device: str = "cuda", dtype: torch.dtype | None = None):
        dev = torch.device(device)
        if dev.type != "cuda" and not interpreting():
            raise BackendUnavailableError(
                "the CUDA backend runs on CUDA; on the CPU only under TRITON_INTERPRET=1")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("no CUDA device is available to torch")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        super().__init__(str(dev), dtype or (torch.bfloat16 if dev.type == "cuda"
                                             else torch.float32))
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

    def prepare_experts(self, qt: QuantTensor):
        if qt.ggml_type in KERNEL_TYPES:
            return QuantExperts.from_quant_tensor(qt, self.device)
        return super().prepare_experts(qt)

    # -- graph ops: Triton kernels; TorchBackend's torch ops while autograd records ----
    def embed(self, table, ids, scale=1.0):
        batch, n = ids.shape
        flat = ids.reshape(-1)
        if isinstance(table, DenseWeight):
            rows = table.w[flat]
        else:
            rows = qmatmul.dequantize(table, self.dtype, ids=flat)
        if scale != 1.0:
            rows = rows * scale
        return rows.reshape(batch, n, -1)

    def linear(self, x, w, bias=None, adapter=None):
        if self.linear_observer is not None:
            self.linear_observer(x, w)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if isinstance(w, DenseWeight):
            y = F.linear(x2, w.w, None if bias is None else bias.to(x.dtype))
        elif records(x2):
            y = _QuantLinearFn.apply(x2, w)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = qmatmul.qmatmul(x2, w, bias)
        return self.add_adapter(x, y.reshape(*lead, y.shape[-1]), adapter)

    def rms_norm(self, x, w, eps):
        if records(x, w):
            return super().rms_norm(x, w, eps)
        return norm.rms_norm(x, w, eps)

    def add_rms_norm(self, x, residual, w, eps):
        """(x + residual, rms_norm(x + residual)) in one pass."""
        if records(x, residual, w):
            return super().add_rms_norm(x, residual, w, eps)
        return norm.rms_norm(x, w, eps, residual=residual)

    def _frequencies(self, spec: RopeSpec) -> torch.Tensor:
        inv = self._inv_freq.get(spec)
        if inv is None:
            inv = torch.from_numpy(spec.frequencies()).to(self.device, torch.float32)
            self._inv_freq[spec] = inv
        return inv

    def rope(self, x, positions, spec: RopeSpec):
        if records(x):
            return super().rope(x, positions, spec)
        return norm.rope(x, positions, self._frequencies(spec), spec.mscale)

    def attention(self, q, k, v, kv: TorchKV | StepKeys, layer, step: Step, scale):
        if records(q, k, v) or isinstance(kv, StepKeys):
            return super().attention(q, k, v, kv, layer, step, scale)
        spec, view = kv.specs[layer], step.views[layer]
        kc, vc = kv.k[layer], kv.v[layer]
        n = q.shape[1]
        attn.write_kv(k, v, kc, vc, view.slots)
        if n > DECODE_MAX_T:
            return self.attend_cache(q, kc, vc, spec, view, scale)
        if spec.v_from_k:
            r = spec.v_from_k
            out = attn.mla_decode_attention(q[..., :r], q[..., r:], kc[:, 0, :, :r],
                                            kc[:, 0, :, r:], step.positions, scale)
        else:
            out = attn.decode_attention(q, kc, vc, step.positions, scale, window=spec.window,
                                        slot_pos=view.key_pos)
        return out.reshape(q.shape[0], n, -1)

    def expert_ffn(self, x, experts, chosen, weights, act):
        """Decode widths (up to DECODE_MAX_T tokens) read nothing on the host, so the step
        can be captured: quantized experts through the GEMV that picks each pair's expert
        by id; others run every expert over every token, scaled by its routing weight there
        (zero where not chosen). Longer chunks run each expert present on its own tokens."""
        if x.shape[0] > DECODE_MAX_T or records(x) or self.linear_observer is not None:
            return super().expert_ffn(x, experts, chosen, weights, act)
        kinds = (experts.gate, experts.up, experts.down)
        if all(isinstance(k, QuantExperts) for k in kinds):
            ids = chosen.reshape(-1)
            gate, up = (qmatmul.gemv_id(x, k.stacked, ids, k.rows) for k in kinds[:2])
            y = qmatmul.gemv_id(self.glu(gate, up, act), experts.down.stacked, ids,
                                experts.down.rows)
            return (y.view(*chosen.shape, -1).float() * weights[..., None]).sum(1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(len(experts.gate)):
            w = (weights * (chosen == e)).sum(-1, keepdim=True).to(x.dtype)
            out += self.expert(x, experts, e, act) * w
        return out

    # -- capture -------------------------------------------------------------------------
    def compile_step(self, fn):
        """The decode step as a CUDA graph (GraphStep); unchanged off CUDA."""
        if not self.device.startswith("cuda"):
            return fn
        return GraphStep(fn, torch.device(self.device))


class _QuantLinearFn(torch.autograd.Function):
    """y = x @ W.T with W quantized and frozen: grad_x = grad_y @ dequant(W), no grad_W
    (the backward LoRA training, issue 13, uses)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return qmatmul.qmatmul(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        return qmatmul.grad_input(grad_y, ctx.w), None
