"""The PyTorch backend (CPU today): quantized linears from qlinear.py, everything else torch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diptych.backends.base import Backend, KVStorage, RopeSpec, Step
from diptych.quant import QuantTensor

from .qlinear import QuantLinear
from .threads import configure_threads


class TorchKV(KVStorage):
    """Full K/V cache: per layer (B, Hkv, capacity, Dh) float32 buffers."""

    def __init__(self, n_layers, batch, capacity, n_kv_heads, head_dim, dtype, device):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu"):
        if device != "cpu":
            raise NotImplementedError("the CUDA path arrives with the Triton kernels")
        configure_threads()
        self.device = device
        self.dtype = torch.float32
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- weights -------------------------------------------------------------------------
    def prepare(self, qt: QuantTensor) -> QuantLinear:
        return QuantLinear.from_quant_tensor(qt)

    def prepare_vector(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def weight_bytes(self, w: QuantLinear) -> int:
        return w.nbytes

    def weight_layout(self, w: QuantLinear) -> str:
        return w.layout

    # -- graph ops -----------------------------------------------------------------------
    def embed(self, table: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        return table.embed_rows(ids.reshape(-1)).reshape(batch, n, -1)

    def linear(self, x, w: QuantLinear, bias=None):
        lead = x.shape[:-1]
        y = w.forward(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y += bias
        return y.reshape(*lead, y.shape[-1])

    def rms_norm(self, x, w, eps):
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def _cos_sin(self, spec: RopeSpec, n_pos: int):
        key = (spec.dim, spec.theta)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].shape[0] < n_pos:
            size = max(n_pos, 2 * (cached[0].shape[0] if cached else 2048))
            inv = 1.0 / (spec.theta ** (torch.arange(0, spec.dim, 2, dtype=torch.float64) / spec.dim))
            ang = torch.arange(size, dtype=torch.float64)[:, None] * inv[None, :]
            cached = (ang.cos().to(self.dtype), ang.sin().to(self.dtype))
            self._rope_cache[key] = cached
        return cached

    def rope(self, x, positions, spec: RopeSpec):
        cos, sin = self._cos_sin(spec, int(positions.max()) + 1)
        cos = cos[positions][:, :, None, :]  # (B, T, 1, dim/2)
        sin = sin[positions][:, :, None, :]
        half = spec.dim // 2
        x1, x2, rest = x[..., :half], x[..., half:spec.dim], x[..., spec.dim:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        return out

    def attention(self, q, k, v, kv: TorchKV, layer, step: Step, scale):
        start, n = step.start, step.n_tokens
        end = start + n
        kc, vc = kv.k[layer], kv.v[layer]
        kc[:, :, start:end] = k.transpose(1, 2)
        vc[:, :, start:end] = v.transpose(1, 2)
        qh = q.transpose(1, 2)  # (B, H, T, Dh)
        keys, values = kc[:, :, :end], vc[:, :, :end]
        if n == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # a chunk after a cached prefix: query i sees keys 0..start+i
            mask = (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None])
            causal = False
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape[0], n, -1)

    def swiglu(self, gate, up):
        return F.silu(gate) * up

    def take_positions(self, x, index: np.ndarray):
        if len(index) == x.shape[1]:
            return x
        return x[:, torch.from_numpy(np.asarray(index, dtype=np.int64))]

    # -- cache, sampling, transfers ------------------------------------------------------
    def alloc_kv(self, n_layers, batch, capacity, n_kv_heads, head_dim) -> TorchKV:
        return TorchKV(n_layers, batch, capacity, n_kv_heads, head_dim, self.dtype, self.device)

    def kv_bytes_per_element(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))

    def new_rng(self, seed):
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return gen

    def sample(self, logits, params, history, rng) -> int:
        from .sampler import sample

        return sample(logits, params, history, rng)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().to(torch.float32).cpu().numpy()
