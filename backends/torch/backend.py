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

from diptych.backends.base import (Backend, CacheView, KVStorage, LayerCacheSpec, LoRA, RopeSpec,
                                   Step, StepKeys)

from . import grad_ops
from .log_likelihood import token_log_likelihood
from .recompute import checkpointed


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def _zeros(shape, dtype, device) -> torch.Tensor:
    """A zeroed cache buffer. On the CPU numpy's calloc maps zero pages that the kernel
    fills on first write, so a large cache costs neither load time nor memory until used."""
    if device == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_DTYPES[dtype]))
    return torch.zeros(shape, dtype=dtype, device=device)


class TorchKV(KVStorage):
    """Per layer a (B, Hkv, slots, k_dim) key buffer and a value buffer like it (none for
    MLA, whose values are a view of the keys)."""

    def __init__(self, specs: list[LayerCacheSpec], batch, dtype, device):
        self.specs = specs
        self.k, self.v = [], []
        for s in specs:
            shape = (batch, s.n_kv_heads, s.slots, s.k_dim)
            self.k.append(_zeros(shape, dtype, device))
            self.v.append(None if s.v_from_k else _zeros(shape, dtype, device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def snapshot(self, layers):
        return [(i, self.k[i][:, :, :n].clone(),
                 None if self.v[i] is None else self.v[i][:, :, :n].clone())
                for i, n in layers]

    def restore(self, copy):
        for i, k, v in copy:
            n = k.shape[2]
            self.k[i][:, :, :n].copy_(k)
            if v is not None:
                self.v[i][:, :, :n].copy_(v)


class TorchBackend(Backend):
    """The torch graph ops on `device` with `dtype` activations; subclasses supply
    `prepare`, `embed` and `linear` for their weight formats."""

    name = "torch"

    def __init__(self, device: str, dtype: torch.dtype, kv_dtype: torch.dtype | None = None):
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # what the cache stores; attention reads it as dtype
        self._rope_cache: dict[RopeSpec, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step_rope: dict[RopeSpec, tuple] = {}

    def inference(self):
        return torch.inference_mode()

    # -- training ------------------------------------------------------------------------
    def tensor(self, values):
        return torch.tensor(np.asarray(values, dtype=np.float32), device=self.device)

    def value_and_grad(self, fn, params):
        leaves = [p.detach().requires_grad_() for p in params]
        loss = fn(leaves)
        loss.backward()
        return float(loss.detach()), [p.grad for p in leaves]

    @torch.no_grad()
    def adamw(self, params, grads, moments, step, lr, betas, eps, weight_decay):
        (b1, b2), out = betas, []
        for p, g, (m, v) in zip(params, grads, moments):
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** step)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
            out.append((m, v))
        return params, out

    def dropout(self, x, p, seed):
        gen = torch.Generator(device=x.device).manual_seed(seed)
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
        return x * keep / (1 - p)

    def checkpoint(self, fn):
        return checkpointed(fn)  # not torch.utils.checkpoint: see recompute.py

    def token_log_likelihood(self, h, w, targets, weights, softcap=0.0, recompute=False):
        # the gradient comes with the value (log_likelihood.py): nothing to recompute
        return token_log_likelihood(self, h, w, targets, weights, softcap)

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
    def add_adapter(self, x, y, adapter: list[LoRA] | None):
        """y + scale * (x A^T) B^T for each pair, on its rows of y: the subclasses' `linear`
        ends here. Computed in the pairs' dtype (autograd records it for A and B)."""
        for p in adapter or ():
            xa = self.dropout(x, p.dropout, p.seed) if p.dropout else x
            delta = ((xa.to(p.a.dtype) @ p.a.T) @ p.b.T * p.scale).to(y.dtype)
            if p.rows is not None:
                delta = F.pad(delta, (p.rows[0], y.shape[-1] - p.rows[1]))
            y = y + delta
        return y

    def rms_norm(self, x, w, eps):
        return grad_ops.rms_norm(x, w.to(x.dtype), eps)

    def _cos_sin(self, spec: RopeSpec, n_pos: int):
        """cos/sin tables of `spec` for positions up to at least `n_pos`, computed in float64.
        Sized to what the steps have reached and doubled as they go on: at a head size of 256
        each table is 1 KiB a position, and the float64 temporaries four times that, all at
        the first token, when the process is nearest its peak."""
        cached = self._rope_cache.get(spec)
        if cached is None or cached[0].shape[0] < n_pos:
            size = max(n_pos, 2 * cached[0].shape[0] if cached else 256)
            inv = torch.from_numpy(spec.frequencies())
            ang = torch.arange(size, dtype=torch.float64)[:, None] * inv[None, :]
            cos = ang.cos().mul_(spec.mscale).to(self.device, self.dtype)
            sin = ang.sin_().mul_(spec.mscale).to(self.device, self.dtype)
            cached = self._rope_cache[spec] = (cos, sin)
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
        if spec.dim == x.shape[-1]:
            return grad_ops.rope(x, cos, sin)
        # partial rotary: the rest of each head passes through
        return torch.cat((grad_ops.rope(x[..., :spec.dim], cos, sin), x[..., spec.dim:]), -1)

    def attention(self, q, k, v, kv: TorchKV | StepKeys, layer, step: Step, scale):
        """The cache write as torch indexing, then SDPA over the cache (`attend_cache`)."""
        view = step.views[layer]
        if isinstance(kv, StepKeys):  # the step's own keys are the whole cache, as they are
            return self.attend_cache(q, k.transpose(1, 2), None if v is None else v.transpose(1, 2),
                                     kv.specs[layer], view, scale)
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
        keys = kc[:, :, :n_keys].to(q.dtype)
        values = vc[:, :, :n_keys].to(q.dtype) if vc is not None else keys[..., :spec.v_from_k]
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

    def glu_halves(self, x, act):
        if act == "silu" and grad_ops.records(x):  # one node: no zero-filled gradient per half
            return grad_ops.silu_glu(x)
        return super().glu_halves(x, act)

    def expert_ffn(self, x, experts, chosen, weights, act):
        """Each expert present in `chosen` on its own tokens only (which ones are present
        is read on the host)."""
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.expert(x[tok], experts, e, act)
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out

    def expert(self, x, experts, e: int, act):
        """Expert e's FFN on x (N, D)."""
        h = self.glu(self.linear(x, experts.gate[e]), self.linear(x, experts.up[e]), act)
        if self.linear_observer is not None:
            chosen = np.full((x.shape[0], 1), e)
            for stacked, rows in ((experts.gate, x), (experts.up, x), (experts.down, h)):
                self.linear_observer(rows, stacked, chosen)
        return self.linear(h, experts.down[e])

    def sigmoid(self, x):
        return x.float().sigmoid()

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
        return TorchKV(specs, batch, self.kv_dtype, self.device)

    def kv_bytes_per_element(self) -> int:
        return torch.finfo(self.kv_dtype).bits // 8

    def ids(self, ids: np.ndarray) -> torch.Tensor:
        # a copy: token ids often come from read-only arrays, which torch would share
        return torch.tensor(np.asarray(ids, dtype=np.int64), device=self.device)

    def new_rng(self, seed):
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return gen

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().to(torch.float32).cpu().numpy()

    # -- sampling ops --------------------------------------------------------------------
    def float32(self, x):
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def topk(self, x, k):
        if k >= x.shape[-1]:
            return torch.sort(x, dim=-1, descending=True)
        return torch.topk(x, k, dim=-1)

    def softmax(self, x):
        return x.softmax(-1, dtype=torch.float32)

    def log_softmax(self, x):
        return torch.log_softmax(x, dim=-1)

    def cumsum(self, x):
        return torch.cumsum(x, dim=-1)

    def finite_rows(self, x):
        return torch.isfinite(x).all(-1)

    def gather(self, x, idx):
        return torch.gather(x, -1, idx)

    def scatter_add(self, x, idx, values):
        return x.scatter_add_(-1, idx, values)

    def scatter(self, x, idx, values):
        return x.scatter(-1, idx, values)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def categorical(self, probs, rng):
        return torch.multinomial(probs, 1, generator=rng)[:, 0]
