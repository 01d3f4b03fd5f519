"""What the CPU and CUDA torch backends share: the graph ops written in torch.

`TorchBackend` leaves the weights to its subclasses (cpu/backend.py: numba kernels over
repacked GGUF blocks; cuda/backend.py: Triton kernels), which also replace ops with fused
kernels where they have them. Everything here is plain torch, which autograd records: the
CUDA backend's training path (an input requiring grad) falls back to these ops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diptych.backends.base import Backend, CacheView, KVStorage, LayerCacheSpec, RopeSpec, Step


class TorchKV(KVStorage):
    """Per layer a (B, Hkv, slots, k_dim) key buffer and a value buffer like it (none for
    MLA, whose values are a view of the keys)."""

    def __init__(self, specs: list[LayerCacheSpec], batch, dtype, device):
        self.specs = specs
        self.k, self.v = [], []
        for s in specs:
            shape = (batch, s.n_kv_heads, s.slots, s.k_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(None if s.v_from_k else torch.zeros(shape, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def snapshot(self, layers):
        return [(i, self.k[i].clone(), None if self.v[i] is None else self.v[i].clone())
                for i in layers]

    def restore(self, copy):
        for i, k, v in copy:
            self.k[i].copy_(k)
            if v is not None:
                self.v[i].copy_(v)


class TorchBackend(Backend):
    """The torch graph ops on `device` with `dtype` activations; subclasses supply
    `prepare`, `embed` and `linear` for their weight formats."""

    name = "torch"

    def __init__(self, device: str, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self._rope_cache: dict[RopeSpec, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step_rope: dict[RopeSpec, tuple] = {}

    def inference(self):
        return torch.inference_mode()

    # -- weights -------------------------------------------------------------------------
    def prepare_vector(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.device)

    def prepare_dense(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.device, self.dtype)

    def weight_bytes(self, w) -> int:
        return w.nbytes

    def weight_layout(self, w) -> str:
        return w.layout

    # -- graph ops -----------------------------------------------------------------------
    def rms_norm(self, x, w, eps):
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)

    def _cos_sin(self, spec: RopeSpec, n_pos: int):
        cached = self._rope_cache.get(spec)
        if cached is None or cached[0].shape[0] < n_pos:
            size = max(n_pos, 2 * (cached[0].shape[0] if cached else 2048))
            inv = torch.from_numpy(spec.frequencies())
            ang = torch.arange(size, dtype=torch.float64)[:, None] * inv[None, :]
            cached = ((ang.cos() * spec.mscale).to(self.device, self.dtype),
                      (ang.sin() * spec.mscale).to(self.device, self.dtype))
            self._rope_cache[spec] = cached
        return cached

    def rope(self, x, positions, spec: RopeSpec):
        # cos/sin of a step's positions are gathered once and shared by q and k of every
        # layer (the same positions object), in the half-split layout: the rotation is then
        # x * cos + swap_halves(x) * (-sin, sin)
        cached = self._step_rope.get(spec)
        if cached is None or cached[0] is not positions:
            cos, sin = self._cos_sin(spec, int(positions.max()) + 1)
            cos, sin = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
            cached = (positions, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
            self._step_rope[spec] = cached
        _, cos, sin = cached
        half = spec.dim // 2
        rot = x if spec.dim == x.shape[-1] else x[..., :spec.dim]
        out = rot * cos + torch.cat((rot[..., half:], rot[..., :half]), -1) * sin
        return out if rot is x else torch.cat((out, x[..., spec.dim:]), -1)

    def attention(self, q, k, v, kv: TorchKV, layer, step: Step, scale):
        """The cache write as torch indexing, then SDPA over the cache (`attend_cache`)."""
        view = step.views[layer]
        kc, vc = kv.k[layer], kv.v[layer]
        where = view.slots[0]
        kc[:, :, where] = k.transpose(1, 2).to(kc.dtype)
        if vc is not None:
            vc[:, :, where] = v.transpose(1, 2).to(vc.dtype)
        return self.attend_cache(q, kc, vc, kv.specs[layer], view, scale)

    def attend_cache(self, q, kc, vc, spec: LayerCacheSpec, view: CacheView, scale):
        """SDPA from q (B, T, H, Dh) over one layer's cache, which already holds this step's
        keys, as the view's host facts say."""
        n, n_keys = q.shape[1], view.n_keys
        keys = kc[:, :, :n_keys]
        values = vc[:, :, :n_keys] if vc is not None else keys[..., :spec.v_from_k]
        mask, causal = view.mask, False
        if isinstance(mask, str):  # no mask tensor when T == n_keys: SDPA's flash kernel
            causal = n == n_keys
            mask = None if causal else torch.ones(n, n_keys, dtype=torch.bool,
                                                  device=q.device).tril(n_keys - n)
        elif mask is not None:
            mask = torch.from_numpy(mask).to(q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape[0], n, -1)

    def glu(self, gate, up, act):
        if act == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh") * up

    def moe(self, x, experts, spec, act):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.linear(flat, experts.router).float()
        weights, chosen = route(logits, spec, experts.score_bias)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():  # each expert on its own tokens only
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            xe = flat[tok]
            y = self.linear(self.glu(self.linear(xe, experts.gate[e]),
                                     self.linear(xe, experts.up[e]), act), experts.down[e])
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out.reshape(x.shape)

    def head_linear(self, x, w):
        return torch.einsum("bthk,hnk->bthn", x, w)

    def concat(self, parts):
        return torch.cat(parts, dim=-1)

    def softcap(self, x, cap):
        return torch.tanh(x / cap) * cap

    def take_positions(self, x, index: np.ndarray):
        if len(index) == x.shape[1]:
            return x
        return x[:, torch.as_tensor(np.asarray(index, dtype=np.int64), device=x.device)]

    # -- cache, sampling, transfers ------------------------------------------------------
    def alloc_kv(self, specs, batch) -> TorchKV:
        return TorchKV(specs, batch, self.dtype, self.device)

    def kv_bytes_per_element(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)

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


def route(logits: torch.Tensor, spec, score_bias=None):
    """MoE routing in fp32: (tokens, experts) router logits -> (weights, expert ids), both
    (tokens, n_used). Softmax or sigmoid scores; an optional selection-only bias; group-
    limited choice (groups ranked by their best score, or by their top-2 sum with sigmoid
    scores as DeepSeek-V3 does); renormalisation and scaling of the chosen weights."""
    scores = logits.softmax(-1) if spec.gating == "softmax" else logits.sigmoid()
    choice = scores if score_bias is None else scores + score_bias.float()
    if spec.n_groups > 1:
        grouped = choice.view(choice.shape[0], spec.n_groups, -1)
        rank = (grouped.topk(2, dim=-1).values.sum(-1) if spec.gating == "sigmoid"
                else grouped.amax(-1))
        keep = torch.zeros_like(rank, dtype=torch.bool)
        keep.scatter_(1, rank.topk(spec.n_groups_used, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), 0.0)
    chosen = choice.topk(spec.n_used, dim=-1).indices
    weights = scores.gather(1, chosen)
    if spec.norm_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.scale, chosen
