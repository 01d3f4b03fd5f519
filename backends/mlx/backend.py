"""The MLX backend: Metal on Apple silicon, MLX's CPU build elsewhere (same code).

Weights are repacked once at load into MLX's affine group-32 format (repack.py) and
multiplied with `mx.quantized_matmul`; norms, RoPE and attention use `mx.fast`. MLX is
lazy: each op only records a graph node, and the graph runs when a value crosses to the
host (`to_numpy`). Nothing here is Metal-only.

Semantics match the torch backend (backends/torch): NeoX (half-split) RoPE on the first
`spec.dim` channels, causal attention over the cached prefix with GQA.

Contract notes:
- `rope` uses `mx.fast.rope` with a per-sequence array offset `positions[:, 0]`: the
  positions of one call must be contiguous within each sequence (start, start+1, ...), which
  is what `Step` (and the Engine) produce. Frequencies are computed in float64 and handed
  to MLX as float32 periods; the angle itself is computed by MLX in float32.
- Activations are float32 on the CPU; on the GPU the default is float16 activations with
  float16 scales (pass `dtype="bfloat16"` for models that overflow fp16).
- The cache write is a slice assignment into per-layer arrays preallocated at capacity;
  MLX donates the buffer, so a decode step writes in place (measured: a 32k-token cache
  costs the same per step as a 512-token one, no copy).

Per-token overhead is small beside `quantized_matmul` (BENCHMARKS.md, MLX section).
mx.compile is used where it measurably helps: RoPE (shape-specialised) and SwiGLU
(shapeless).
Attention is not compiled: its key length grows every step, so a shape-specialised trace
would be rebuilt every step.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import mlx.core as mx
import numpy as np

from diptych.backends.base import Backend, KVStorage, LayerCacheSpec, RopeSpec, Step, StepKeys
from diptych.errors import BackendUnavailableError
from diptych.quant import QuantTensor

from .repack import MLXWeight, dtype_name, mx_dtype, repack_tensor


class MLXKV(KVStorage):
    """Per layer a (B, Hkv, slots, k_dim) key array and a value array like it (none for
    MLA, whose values are a view of the keys), allocated (evaluated) once.

    Writes are slice assignments; MLX updates the buffer in place when nothing else holds
    it, which is the case between steps."""

    def __init__(self, specs: list[LayerCacheSpec], batch, dtype):
        self.specs = specs
        self.k, self.v = [], []
        for s in specs:
            shape = (batch, s.n_kv_heads, s.slots, s.k_dim)
            self.k.append(mx.zeros(shape, dtype=dtype))
            self.v.append(None if s.v_from_k else mx.zeros(shape, dtype=dtype))
        mx.eval(self.k, [v for v in self.v if v is not None])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v if a is not None)

    def snapshot(self, layers):
        copy = [(i, mx.array(self.k[i][:, :, :n]),
                 None if self.v[i] is None else mx.array(self.v[i][:, :, :n]))
                for i, n in layers]
        mx.eval([a for _, k, v in copy for a in (k, v) if a is not None])
        return copy

    def restore(self, copy):
        for i, k, v in copy:  # the snapshot stays intact: the writes copy from it
            n = k.shape[2]
            self.k[i][:, :, :n] = k
            if v is not None:
                self.v[i][:, :, :n] = v
        mx.eval([a for i, _, _ in copy for a in (self.k[i], self.v[i]) if a is not None])


class MLXRng:
    """A PRNG key that advances on every draw (seeded through mx.random.key)."""

    def __init__(self, seed: int | None):
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.key = mx.random.key(seed % (1 << 64))

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


def _silu_mul(gate, up):
    return gate * mx.sigmoid(gate) * up


def _gelu_tanh_mul(gate, up):
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi)
    return 0.5 * gate * (1.0 + mx.tanh(inner)) * up


def _rope(x, offset, periods, *, dims):
    # (B, T, H, D) -> (B, H, T, D) for mx.fast.rope, and back
    return mx.fast.rope(x.swapaxes(1, 2), dims, traditional=False, base=None, scale=1.0,
                        offset=offset, freqs=periods).swapaxes(1, 2)


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, device: str | None = None, dtype=None, scale_dtype=None,
                 compile: bool = True):
        """device: "cpu" | "gpu" | None (MLX's default device; setting one changes MLX's
        default device for the process). dtype: activation dtype (float32 on the CPU,
        float16 on the GPU by default). scale_dtype: the quantized weights' scale/bias
        dtype (float32 on the CPU: exact; on the GPU the activation dtype)."""
        if device is not None:
            if device not in ("cpu", "gpu"):
                raise BackendUnavailableError(f"MLX device must be 'cpu' or 'gpu', got {device!r}")
            want = mx.cpu if device == "cpu" else mx.gpu
            if not mx.is_available(want):
                raise BackendUnavailableError("MLX has no GPU here (Metal on Apple silicon, "
                                              "or an MLX CUDA build); use device='cpu'")
            if mx.default_device() != want:
                mx.set_default_device(want)
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        default = mx.float32 if self.device == "cpu" else mx.float16
        self.dtype = mx_dtype(dtype) if dtype is not None else default
        self._differentiable = True  # False inside inference(): loss pieces skip their gradient
        self.scale_dtype = (mx_dtype(scale_dtype) if scale_dtype is not None
                            else (mx.float32 if self.device == "cpu" else self.dtype))
        self._freqs: dict[RopeSpec, mx.array] = {}
        self._ropes: dict[int, object] = {}
        self._offset: tuple = (None, None)
        self._compile = compile
        self._glu = {name: mx.compile(fn, shapeless=True) if compile else fn
                     for name, fn in (("silu", _silu_mul), ("gelu_tanh", _gelu_tanh_mul))}

    def describe(self) -> str:
        return (f"{self.name} ({self.device}, {dtype_name(self.dtype)} activations, "
                f"{dtype_name(self.scale_dtype)} scales)")

    # -- weights -------------------------------------------------------------------------
    def prepare(self, qt: QuantTensor) -> MLXWeight:
        # dense weights are stored in the activation dtype (lossless for float32), except a
        # BF16 weight under fp16 activations, which keeps bf16 (fp16 lacks its range)
        dense = self.dtype if self.dtype == mx.float32 or qt.type_name != "BF16" else None
        return repack_tensor(qt, scale_dtype=self.scale_dtype, dense_dtype=dense)

    def prepare_experts(self, qt: QuantTensor) -> MLXWeight:
        """All experts repacked as one matrix of their rows, then viewed as
        (n_experts, out, ...) arrays for mx.gather_qmm / mx.gather_mm."""
        n, rows, cols = qt.shape
        w = self.prepare(QuantTensor(qt.name, qt.ggml_type, (n * rows, cols), qt.data))

        def per_expert(a):
            return None if a is None else a.reshape(n, rows, -1)

        return replace(w, w=per_expert(w.w), scales=per_expert(w.scales),
                       biases=per_expert(w.biases))

    def prepare_vector(self, values: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(values, dtype=np.float32)).astype(self.dtype)

    def prepare_dense(self, values: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(values, dtype=np.float32)).astype(self.dtype)

    def weight_bytes(self, w: MLXWeight) -> int:
        return w.nbytes

    def weight_layout(self, w: MLXWeight) -> str:
        return w.layout

    # -- graph ops -----------------------------------------------------------------------
    def embed(self, table: MLXWeight, ids: mx.array, scale: float = 1.0) -> mx.array:
        flat = ids.reshape(-1)
        if table.quantized:  # gather the packed rows, dequantize only those
            rows = mx.dequantize(table.w[flat], table.scales[flat], table.biases[flat],
                                 group_size=table.group_size, bits=table.bits,
                                 dtype=self.dtype)
        else:
            rows = table.w[flat].astype(self.dtype)
        if scale != 1.0:
            rows = rows * scale
        return rows.reshape(*ids.shape, -1)

    def linear(self, x, w: MLXWeight, bias=None, adapter=None):
        if self.linear_observer is not None:
            self.linear_observer(x, w)
        if w.quantized:
            y = mx.quantized_matmul(x, w.w, w.scales, w.biases, transpose=True,
                                    group_size=w.group_size, bits=w.bits)
        else:
            y = x @ w.w.T
        if y.dtype != self.dtype:
            y = y.astype(self.dtype)
        y = y if bias is None else y + bias
        for p in adapter or ():  # beside the base: y + scale * (x A^T) B^T on the pair's rows
            xa = self.dropout(x, p.dropout, p.seed) if p.dropout else x
            delta = ((xa @ p.a.T) @ p.b.T * p.scale).astype(y.dtype)
            if p.rows is not None:
                pad = [(0, 0)] * (delta.ndim - 1) + [(p.rows[0], y.shape[-1] - p.rows[1])]
                delta = mx.pad(delta, pad)
            y = y + delta
        return y

    def rms_norm(self, x, w, eps):
        return mx.fast.rms_norm(x, w, eps)

    def _periods(self, spec: RopeSpec) -> mx.array:
        p = self._freqs.get(spec)
        if p is None:
            p = mx.array((1.0 / spec.frequencies()).astype(np.float32))
            self._freqs[spec] = p
        return p

    def rope(self, x, positions, spec: RopeSpec):
        # positions are contiguous per sequence: the offset is the first column, taken once
        # per Step (q and k of every layer share it)
        pos, offset = self._offset
        if pos is not positions:
            offset = positions[:, 0]
            self._offset = (positions, offset)
        fn = self._ropes.get(spec.dim)
        if fn is None:
            fn = partial(_rope, dims=spec.dim)
            if self._compile:  # shape-specialised: one trace per (T, H), ~2.5x less overhead
                fn = mx.compile(fn)
            self._ropes[spec.dim] = fn
        out = fn(x, offset, self._periods(spec))
        if spec.mscale != 1.0:  # YaRN: the rotated channels only
            out = mx.concatenate([out[..., :spec.dim] * spec.mscale, out[..., spec.dim:]], axis=-1)
        return out

    def attention(self, q, k, v, kv: MLXKV | StepKeys, layer, step: Step, scale):
        spec, view = kv.specs[layer], step.views[layer]
        if isinstance(kv, StepKeys):  # the step's own keys are the whole cache, as they are
            kc = k.transpose(0, 2, 1, 3)
            vc = None if v is None else v.transpose(0, 2, 1, 3)
        else:
            # the step's K/V into their slots (put_along_axis: MLX's gradient of an indexed
            # assignment on a middle axis fails)
            kt, where = k.transpose(0, 2, 1, 3), view.slots[0][None, None, :, None]
            kv.k[layer] = kc = mx.put_along_axis(kv.k[layer], mx.broadcast_to(where, kt.shape),
                                                 kt.astype(kv.k[layer].dtype), axis=2)
            vc = kv.v[layer]
            if vc is not None:
                vt = v.transpose(0, 2, 1, 3)
                kv.v[layer] = vc = mx.put_along_axis(vc, mx.broadcast_to(where, vt.shape),
                                                     vt.astype(vc.dtype), axis=2)
        keys = kc[:, :, :view.n_keys, :]
        values = vc[:, :, :view.n_keys, :] if vc is not None else keys[..., :spec.v_from_k]
        # MLX's "causal" mask is aligned to the last key, as the view's is
        mask = mx.array(view.mask) if isinstance(view.mask, np.ndarray) else view.mask
        out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), keys, values,
                                                   scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(q.shape[0], step.n_tokens, -1)

    def glu(self, gate, up, act):
        return self._glu[act](gate, up)

    def expert_ffn(self, x, experts, chosen, weights, act):
        """Each token through its chosen experts, picked from the stacked weights on the
        device (mx.gather_qmm; mx.gather_mm for dense experts)."""
        xs = x[:, None, None, :]  # (N, 1, 1, D): one row per token, batched by expert
        h = self.glu(self._gather_linear(xs, experts.gate, chosen),
                     self._gather_linear(xs, experts.up, chosen), act)  # (N, k, 1, ff)
        if self.linear_observer is not None:
            for stacked, rows in ((experts.gate, x), (experts.up, x), (experts.down, h[:, :, 0])):
                self.linear_observer(rows, stacked, chosen)
        y = self._gather_linear(h, experts.down, chosen)[:, :, 0, :]  # (N, k, D)
        return (y * weights[..., None].astype(y.dtype)).sum(1)

    def _gather_linear(self, x, w: MLXWeight, chosen):
        """x (..., 1, K) @ W[chosen].T for stacked experts W (E, N, K) -> (..., 1, N)."""
        if w.quantized:
            y = mx.gather_qmm(x, w.w, w.scales, w.biases, rhs_indices=chosen, transpose=True,
                              group_size=w.group_size, bits=w.bits)
        else:
            y = mx.gather_mm(x, w.w.swapaxes(-1, -2), rhs_indices=chosen)
        return y.astype(self.dtype)

    def sigmoid(self, x):
        return mx.sigmoid(x.astype(mx.float32))

    def head_linear(self, x, w):
        # (B, T, H, K) -> (B, H, T, K) @ (H, K, N) -> (B, H, T, N) -> (B, T, H, N)
        return (x.transpose(0, 2, 1, 3) @ w.transpose(0, 2, 1)).transpose(0, 2, 1, 3)

    def concat(self, parts):
        return mx.concatenate(parts, axis=-1)

    def softcap(self, x, cap):
        return mx.tanh(x / cap) * cap

    def take_positions(self, x, index: np.ndarray):
        index = np.asarray(index)
        n = x.shape[1]
        if len(index) == n and (index == np.arange(n)).all():
            return x
        if len(index) == 1:
            i = int(index[0])
            return x[:, i:i + 1]
        return x[:, mx.array(index.astype(np.int32))]

    # -- cache, sampling, transfers ------------------------------------------------------
    def alloc_kv(self, specs, batch) -> MLXKV:
        return MLXKV(specs, batch, self.dtype)

    def kv_bytes_per_element(self) -> int:
        return self.dtype.size

    def ids(self, ids) -> mx.array:
        return mx.array(np.asarray(ids, dtype=np.int32))

    def new_rng(self, seed) -> MLXRng:
        return MLXRng(seed)

    def to_numpy(self, x) -> np.ndarray:
        return np.array(x.astype(mx.float32))

    # -- training ------------------------------------------------------------------------
    def tensor(self, values) -> mx.array:
        return mx.array(np.asarray(values, dtype=np.float32))

    def value_and_grad(self, fn, params):
        loss, grads = mx.value_and_grad(fn)(list(params))
        mx.eval(loss, grads)
        return float(loss), grads

    def adamw(self, params, grads, moments, step, lr, betas, eps, weight_decay):
        (b1, b2), new_params, new_moments = betas, [], []
        for p, g, (m, v) in zip(params, grads, moments):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p * (1 - lr * weight_decay) - (lr / (1 - b1 ** step)) * m / (
                mx.sqrt(v / (1 - b2 ** step)) + eps)
            new_params.append(p)
            new_moments.append((m, v))
        mx.eval(new_params, new_moments)
        return new_params, new_moments

    def dropout(self, x, p, seed):
        keep = mx.random.bernoulli(1 - p, x.shape, key=mx.random.key(seed))
        return mx.where(keep, x / (1 - p), mx.zeros_like(x))

    def checkpoint(self, fn):
        return mx.checkpoint(fn)

    @contextmanager
    def inference(self):
        """No gradient flows: the loss pieces skip computing theirs."""
        before, self._differentiable = self._differentiable, False
        try:
            yield
        finally:
            self._differentiable = before

    def token_log_likelihood(self, h, w, targets, weights, softcap=0.0, recompute=False):
        # the gradient in h comes with the value, as on torch (backends/torch/
        # log_likelihood.py): the head runs twice (logits, then g W), not three times
        # (logits, their recomputation, the product's own vjp), and no logits are kept
        if not self._differentiable:
            return _log_likelihood(self, h, w, targets, weights, softcap, grad=False)[0]
        return _log_likelihood_piece(self, w, softcap)(h, targets, weights)[0]

    # -- sampling ops --------------------------------------------------------------------
    def float32(self, x):
        return x.astype(mx.float32)

    def zeros(self, shape):
        return mx.zeros(shape, dtype=mx.float32)

    def topk(self, x, k):
        # MLX orders NaN last, torch first (the contract): order by a key with NaN as +inf
        key = -mx.where(mx.isnan(x), math.inf, x)
        if k >= x.shape[-1]:
            idx = mx.argsort(key, axis=-1)
        else:  # the k largest in any order, then only those sorted
            idx = mx.argpartition(key, k - 1, axis=-1)[..., :k]
            idx = mx.take_along_axis(idx, mx.argsort(mx.take_along_axis(key, idx, axis=-1),
                                                     axis=-1), axis=-1)
        return mx.take_along_axis(x, idx, axis=-1), idx

    def softmax(self, x):
        return mx.softmax(x.astype(mx.float32), axis=-1)

    def log_softmax(self, x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def cumsum(self, x):
        return mx.cumsum(x, axis=-1)

    def finite_rows(self, x):
        return mx.isfinite(x).all(axis=-1)

    def gather(self, x, idx):
        return mx.take_along_axis(x, idx, axis=-1)

    def scatter_add(self, x, idx, values):
        rows = mx.arange(x.shape[0])[:, None]
        return x.at[rows, idx].add(values)

    def scatter(self, x, idx, values):
        return mx.put_along_axis(x, idx, values, axis=-1)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def categorical(self, probs, rng: MLXRng):
        return mx.random.categorical(mx.log(probs), axis=-1, key=rng.next())


def _log_likelihood(backend, h, w, targets, weights, softcap, grad: bool):
    """sum_i weights[i] log softmax(h W^T)[i, targets[i]] and, with `grad`, its gradient
    in h: w (onehot - p) through the softcap, times W."""
    z = backend.linear(h, w).astype(mx.float32)
    if softcap:
        t = mx.tanh(z / softcap)
        z = t * softcap
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    idx = targets.reshape(-1, 1)
    value = (mx.take_along_axis(logp, idx, axis=-1).reshape(-1) * weights).sum()
    if not grad:
        return value, None
    onehot = mx.arange(z.shape[-1])[None, :] == idx
    g = weights[:, None] * (onehot.astype(mx.float32) - mx.exp(logp))
    if softcap:
        g = g * (1 - t * t)
    g = g.astype(backend.dtype)
    if w.quantized:
        grad_h = mx.quantized_matmul(g, w.w, w.scales, w.biases, transpose=False,
                                     group_size=w.group_size, bits=w.bits)
    else:
        grad_h = g @ w.w
    return value, grad_h.astype(h.dtype)


def _log_likelihood_piece(backend, w, softcap):
    """(value, its gradient in h) of one piece, as a function whose vjp is that gradient."""
    @mx.custom_function
    def piece(h, targets, weights):
        return _log_likelihood(backend, h, w, targets, weights, softcap, grad=True)

    @piece.vjp
    def piece_vjp(primals, cotangents, outputs):
        _, targets, weights = primals
        return outputs[1] * cotangents[0], mx.zeros_like(targets), mx.zeros_like(weights)

    return piece
