"""The backend contract: the small vocabulary of operations the model graph is written in.

`diptych.model.graph` calls only these methods (plus `+`, `*` and `.reshape` on the backend's own
array type, which torch and MLX arrays both have). A backend may fuse several of them into
one kernel; the graph does not care. Arrays carry a batch dimension first.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diptych.errors import InvalidArgumentError
from diptych.quant import QuantTensor

Array = Any  # the backend's own array type (torch.Tensor, mx.array)



@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding on the first `dim` channels of each head, NeoX (half-split) pairing:
    pair i turns by position * frequency i, with frequencies theta^(-2i/dim) unless
    `inv_freq` gives them (scaled RoPE: linear, llama3, YaRN); cos and sin are multiplied
    by `mscale` (YaRN's attention factor)."""

    dim: int
    theta: float
    inv_freq: tuple[float, ...] | None = None
    mscale: float = 1.0

    def frequencies(self) -> np.ndarray:
        if self.inv_freq is not None:
            return np.asarray(self.inv_freq, dtype=np.float64)
        return self.theta ** -(np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)


@dataclass(frozen=True)
class LoRA:
    """A low-rank pair beside a frozen base matrix W (N, K): `linear` adds
    scale * (x A^T) B^T, with A (r, K) and B (n, r) backend arrays in PEFT's shapes. `rows`
    (start, stop) places the n outputs on those rows of a stacked matrix (an adapter on q
    within Q, K and V stored as one), all N rows when None (then n == N). With `dropout`
    > 0 (training), x goes through `Backend.dropout(x, dropout, seed)` before A, as PEFT's
    lora_dropout does."""

    a: Array
    b: Array
    scale: float
    rows: tuple[int, int] | None = None
    dropout: float = 0.0
    seed: int = 0


@dataclass
class CacheView:
    """Where one step writes in a layer's cache and which keys its queries see, as the
    runtime's slot policy decides (diptych.inference.slots).

    `slots` (B, T) backend ints: the slot each new token's K/V goes to. `key_pos` (B, slots)
    backend ints, the position each slot holds after the write (-1: empty), or None when
    slot s holds position s. A query at t sees keys at positions p <= t (and, in a window
    layer, p > t - window): that is all a kernel reading positions needs. Attention over a
    prefix of the slots (eager backends) uses the first `n_keys` slots with `mask`: None
    (every query sees all of them), "causal" (query i of T sees the first n_keys - T + i + 1)
    or a (T, n_keys) host bool array.
    """

    slots: Array
    key_pos: Array | None
    n_keys: int
    mask: np.ndarray | str | None


@dataclass
class Step:
    """Where one forward call sits in the sequence.

    `positions` is a backend int array (B, T) so a decode step can be captured and replayed;
    `n_tokens` is T; `views[i]` is layer i's CacheView.
    """

    positions: Array
    n_tokens: int
    views: list[CacheView]


@dataclass(frozen=True)
class LayerCacheSpec:
    """The cache storage of one layer: `slots` token slots, each holding `k_dim` key values
    per KV head and as many value values.

    window > 0: sliding-window attention over a ring buffer (the runtime's slot policy:
        diptych.inference.slots); a query at t sees keys at t - window < p <= t.
    v_from_k > 0: MLA; no V storage: values are the first v_from_k channels of the keys
        (the latent), so one KV head of k_dim = kv_lora + rope values is all a token costs.
    """

    slots: int
    n_kv_heads: int
    k_dim: int
    window: int = 0
    v_from_k: int = 0

    @property
    def values_per_slot(self) -> int:
        v = 0 if self.v_from_k else self.k_dim
        return self.n_kv_heads * (self.k_dim + v)


class KVStorage(ABC):
    """A backend's storage for a KV cache: per layer the buffers its LayerCacheSpec asks
    for, allocated once."""

    specs: list[LayerCacheSpec]

    @abstractmethod
    def snapshot(self, layers: list[tuple[int, int]]) -> Any:
        """A copy of each (layer, n) pair's first n slots, for `restore`."""

    @abstractmethod
    def restore(self, copy: Any) -> None:
        """Put a snapshot's slots back (the slots past them keep what they hold)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes actually held by the storage arrays."""


@dataclass(frozen=True)
class StepKeys:
    """In place of a cache, for a forward from an empty context (`graph.forward_all`): the
    keys and values each query may see are the step's own, so `attention` reads k and v as
    they are, with the view's mask, and nothing is stored (a cache would only be written to
    be read back, and held, with every layer's keys, until autograd is done)."""

    specs: list[LayerCacheSpec]


class Backend(ABC):
    """Where the graph runs: weights prepared once, the graph's ops, cache storage, sampling.
    Policy (cache layout, chunking, memory planning, validation) stays in the runtime; see
    docs/ARCHITECTURE.md, "The backend contract"."""

    name: str
    device: str
    #: Set by the runtime while it collects activation statistics (inference/imatrix.py),
    #: else None: called as `linear_observer(x, w)` with each `linear`'s input and weight,
    #: and by `expert_ffn` as `linear_observer(x, stacked, chosen)` for each of the routed
    #: experts' gate, up and down (`experts.gate`, ...): row n of x (N, D) or (N, k, D)
    #: goes through experts chosen[n] (N, k ints; a host array or the backend's).
    #: Steps replayed from a capture (CUDA graphs) do not call it.
    linear_observer: Any = None
    #: Set by `on_first_use`: told of work done once that the user waits for, else None.
    first_use_listener: Any = None
    #: A backend whose prepared weights are worth keeping on disk (`keep_prepared`) names
    #: their layout here; a change of layout must change the name. None: nothing is kept.
    prepared_layout: str | None = None

    # -- weights -------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, qt: QuantTensor) -> Any:
        """Repack a 2-D weight once at load; it stays quantized on the device."""

    def prepare_stacked(self, name: str, parts: list[QuantTensor]) -> Any:
        """2-D weights of one type and width stacked by rows into one prepared matrix (a
        fused QKV or gate/up); by default prepared from a stacked copy of their blocks."""
        return self.prepare(QuantTensor.stack_rows(name, parts))

    def prepare_table(self, qt: QuantTensor) -> Any:
        """A token embedding that `embed` alone reads (the output has its own matrix); by
        default prepared as any matrix."""
        return self.prepare(qt)

    def prepare_experts(self, qt: QuantTensor) -> Any:
        """Routed experts stacked (n_experts, out, in), as `expert_ffn` reads them; by
        default a list of the experts' prepared matrices."""
        return [self.prepare(qt.matrix(e)) for e in range(qt.shape[0])]

    def keep_prepared(self, model: Path) -> contextlib.AbstractContextManager:
        """Entered around preparing the weights of the model file at `model`: with a
        `prepared_layout`, the prepared weights are kept on disk for the file's later loads
        (sources/prepared_cache.py: the CPU backend's repacked copies)."""
        if self.prepared_layout is None:
            return contextlib.nullcontext()
        from diptych.sources import prepared_cache

        return prepared_cache.kept_for(model, self.prepared_layout)

    @abstractmethod
    def prepare_vector(self, values: np.ndarray) -> Array:
        """A small float32 1-D tensor (norm weight, bias) on the device."""

    @abstractmethod
    def prepare_dense(self, values: np.ndarray) -> Array:
        """A float array (any rank) in the activation dtype, e.g. MLA's per-head matrices."""

    @abstractmethod
    def weight_bytes(self, w: Any) -> int:
        """Bytes a prepared weight holds on the device."""

    @abstractmethod
    def weight_layout(self, w: Any) -> str:
        """A short description of how a prepared weight is stored and multiplied."""

    # -- graph ops -----------------------------------------------------------------------
    @abstractmethod
    def embed(self, table: Any, ids: Array, scale: float = 1.0) -> Array:
        """(B, T) ids -> (B, T, D) rows of a (possibly quantized) table, times scale."""

    @abstractmethod
    def linear(self, x: Array, w: Any, bias: Array | None = None,
               adapter: list[LoRA] | None = None) -> Array:
        """x (B, T, K) @ W.T (+ bias) -> (B, T, N), plus each adapter pair computed beside the
        base (unfused). Differentiable in x and in the pairs' A and B; W gets no gradient."""

    @abstractmethod
    def rms_norm(self, x: Array, w: Array, eps: float) -> Array: ...

    def add_rms_norm(self, x: Array, residual: Array, w: Array, eps: float) -> tuple:
        """(x + residual, rms_norm(x + residual)): a backend may do both in one pass."""
        h = x + residual
        return h, self.rms_norm(h, w, eps)

    @abstractmethod
    def rope(self, x: Array, positions: Array, spec: RopeSpec) -> Array:
        """x (B, T, H, Dh), positions (B, T)."""

    @abstractmethod
    def attention(self, q: Array, k: Array, v: Array | None, kv: KVStorage | StepKeys,
                  layer: int, step: Step, scale: float) -> Array:
        """Write k, v (B, T, Hkv, Dh) into layer `layer` of the cache at the slots of
        `step.views[layer]`, then attend from q (B, T, H, Dh) over the keys that view lets
        each query see (with StepKeys: over k and v themselves, position j in slot j). For
        an MLA layer v is None and the values are the first `v_from_k` key channels.
        -> (B, T, H * value dim)."""

    @abstractmethod
    def glu(self, gate: Array, up: Array, act: str) -> Array:
        """act(gate) * up; act is "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""

    def glu_halves(self, x: Array, act: str) -> Array:
        """`glu` of a stacked gate and up projection: x (..., 2F) -> act(x[..., :F]) *
        x[..., F:]."""
        ff = x.shape[-1] // 2
        return self.glu(x[..., :ff], x[..., ff:], act)

    @abstractmethod
    def expert_ffn(self, x: Array, experts: Any, chosen: Array, weights: Array,
                   act: str) -> Array:
        """Routed experts (diptych.model.weights.Experts) on x (N, D): token n goes through
        experts chosen[n] (N, k ints), their outputs summed with weights[n] (N, k float32).
        The routing (diptych.model.moe) is the runtime's; this runs the chosen experts."""

    @abstractmethod
    def sigmoid(self, x: Array) -> Array:
        """Elementwise logistic sigmoid, computed in and returned as float32."""

    @abstractmethod
    def head_linear(self, x: Array, w: Array) -> Array:
        """Per-head matmul: x (B, T, H, K), w (H, N, K) from prepare_dense -> (B, T, H, N)."""

    @abstractmethod
    def concat(self, parts: list[Array]) -> Array:
        """Concatenate along the last axis."""

    @abstractmethod
    def softcap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap)."""

    @abstractmethod
    def take_positions(self, x: Array, index: np.ndarray) -> Array:
        """x (B, T, D) -> (B, len(index), D): the positions whose logits are wanted."""

    # -- cache, sampling, transfers ------------------------------------------------------
    @abstractmethod
    def alloc_kv(self, specs: list[LayerCacheSpec], batch: int) -> KVStorage:
        """Zeroed storage for the layers' caches."""

    @abstractmethod
    def kv_bytes_per_element(self) -> int: ...

    @abstractmethod
    def ids(self, ids: np.ndarray) -> Array:
        """Host int array -> backend int array."""

    @abstractmethod
    def new_rng(self, seed: int | None) -> Any:
        """A random generator for `categorical`, seeded (or from the OS with None)."""

    @abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray: ...

    # -- row ops: the sampler (diptych.inference.sampler) and MoE routing (diptych.model.moe)
    # are written with these. Each works on the last axis, row by row, on the device.
    @abstractmethod
    def float32(self, x: Array) -> Array:
        """x as float32 (logits, ids or flags)."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...]) -> Array:
        """A float32 array of zeros."""

    @abstractmethod
    def topk(self, x: Array, k: int) -> tuple[Array, Array]:
        """The k largest values of each row, in descending order, and their indices
        (1 <= k <= N; k = N sorts the row). NaN counts as larger than any number, as in
        torch.topk: the sampler finds a non-finite row by its best candidate."""

    def scatter_topk(self, x: Array, idx: Array, values: Array, k: int) -> tuple[Array, Array]:
        """topk(scatter(x, idx, values), k): the k best of x with values put at idx (the
        sampler's penalised logits); a backend may find them without writing that row."""
        return self.topk(self.scatter(x, idx, values), k)

    @abstractmethod
    def softmax(self, x: Array) -> Array:
        """Softmax over the last axis, computed in and returned as float32."""

    @abstractmethod
    def log_softmax(self, x: Array) -> Array: ...

    @abstractmethod
    def cumsum(self, x: Array) -> Array: ...

    @abstractmethod
    def finite_rows(self, x: Array) -> Array:
        """(R,) bool: whether every value of each row is finite."""

    @abstractmethod
    def gather(self, x: Array, idx: Array) -> Array:
        """out[r, j] = x[r, idx[r, j]]."""

    @abstractmethod
    def scatter_add(self, x: Array, idx: Array, values: Array) -> Array:
        """x with values[r, j] added at x[r, idx[r, j]] (repeated indices add up); x itself
        may be updated and returned."""

    @abstractmethod
    def scatter(self, x: Array, idx: Array, values: Array) -> Array:
        """A copy of x with values[r, j] written at [r, idx[r, j]] (an index repeated in a
        row comes with equal values); x itself is unchanged."""

    @abstractmethod
    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array: ...

    @abstractmethod
    def categorical(self, probs: Array, rng: Any) -> Array:
        """(R,) indices, one draw per row from the row's probabilities (non-negative, not
        necessarily normalised), with the generator from `new_rng`."""

    # -- training: the runtime's loop (diptych.training) differentiates and updates through
    # these; data order, masks, loss, schedule and checkpoints are the runtime's.
    def tensor(self, values: np.ndarray) -> Array:
        """A float32 array on the device holding host `values` (adapter weights, optimizer
        state, loss masks)."""
        raise NotImplementedError(f"{self.name} does not train")

    def value_and_grad(self, fn, params: list[Array]) -> tuple[float, list[Array]]:
        """fn(params) -> a scalar loss array; its value and its gradient in each of `params`
        (float32 arrays from `tensor`)."""
        raise NotImplementedError(f"{self.name} does not train")

    def bf16_native(self) -> bool:
        """Whether this device multiplies bf16 matrices faster than fp32 ones (what
        training's compute_dtype "auto" asks)."""
        return False

    def training_products(self, dtype: str):
        """A context in which training's products with the base weights run in `dtype`:
        "fp32", or "bf16" (bf16 inputs, fp32 accumulation) where the backend has it."""
        if dtype != "fp32":
            raise InvalidArgumentError(f"the {self.name} backend trains with fp32 products "
                                       f"only (compute_dtype={dtype!r})")
        return contextlib.nullcontext()

    def adamw(self, params: list[Array], grads: list[Array], moments: list[tuple[Array, Array]],
              step: int, lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float) -> tuple[list[Array], list[tuple[Array, Array]]]:
        """One AdamW update (decoupled weight decay, bias-corrected moments) of each param
        with its gradient; `step` counts from 1. Returns the new params and moments (a
        backend may update them in place and return them)."""
        raise NotImplementedError(f"{self.name} does not train")

    def dropout(self, x: Array, p: float, seed: int) -> Array:
        """x with each element zeroed with probability p and the others divided by 1 - p.
        The mask depends on (seed, x's shape) alone, so a recomputed layer (`checkpoint`)
        draws the one its forward pass drew."""
        raise NotImplementedError(f"{self.name} does not train")

    def token_log_likelihood(self, h: Array, w: Any, targets: Array, weights: Array,
                             softcap: float = 0.0, recompute: bool = False) -> Array:
        """sum_i weights[i] * log softmax(logits_i)[targets[i]], the logits of rows h (n, D)
        being h W^T (then softcap(., softcap) when softcap > 0): the training loss of one
        piece of positions. Differentiable in h. With `recompute`, no (n, vocab) array is
        kept for the backward pass: by default the logits are then computed again there
        (`checkpoint`); a backend may instead compute the gradient in the forward pass."""
        def piece(x):
            logits = self.linear(x, w)
            if softcap:
                logits = self.softcap(logits, softcap)
            picked = self.gather(self.log_softmax(logits), targets.reshape(-1, 1))
            return (picked.reshape(-1) * weights).sum()

        return (self.checkpoint(piece) if recompute else piece)(h)

    def checkpoint(self, fn):
        """fn as autograd sees it, with its activations recomputed in the backward pass
        instead of kept (gradient checkpointing); by default fn itself. fn takes arrays
        only, and every array the gradient must reach is one of its arguments (MLX
        differentiates a checkpointed function in its arguments alone)."""
        return fn

    def inference(self):
        """A context for forward passes no gradient flows through (the backend may then
        skip autograd bookkeeping)."""
        return contextlib.nullcontext()

    def compile_step(self, fn):
        """A fixed-width step fn(tokens, positions, *cache view arrays, host facts) as the
        backend runs it best (a CUDA graph replays it); by default fn itself."""
        return fn

    def on_first_use(self, listener) -> None:
        """Have `listener(what)` called when work starts that is done once and that the
        user waits for (compiling kernels for this machine, measuring its speed; `what`
        says what, briefly: "compiling the Q8_0 deq_rows kernel for this CPU"), and
        `listener(None)` when it is done; None removes it. The runtime tells it of its own
        such work too (speculative decoding's costs)."""
        self.first_use_listener = listener

    def use_fast_products(self) -> None:
        """Take the fastest products for the weights prepared from now on, activations
        rounded where the hardware multiplies rounded ones faster (`load(numerics="fast")`
        sets it). Backends without such products need not override it: theirs stay
        exact."""

    def use_llama_cpp_rounding(self) -> None:
        """Round as llama.cpp's CPU backend does around the products of weights prepared
        from now on (each activation row in the form the weight type multiplies: q8_0,
        q8_1, q8_K blocks or fp16), so figures compare with llama.cpp's; `load(numerics=
        "llama.cpp")` sets it. Not by default."""
        raise InvalidArgumentError(f"llama.cpp's CPU rounding is reproduced by the torch "
                                   f"backend on the CPU only, not by {self.describe()}")

    def describe(self) -> str:
        return f"{self.name} ({self.device})"

    def speed_key(self) -> str:
        """What sets this backend's speed, as text: it keys speeds measured once and kept
        (speculative decoding's costs, inference/speculative_costs.py)."""
        return self.describe()
