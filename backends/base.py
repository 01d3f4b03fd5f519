"""The backend contract: the small vocabulary of operations the model graph is written in.

`diptych.graph` calls only these methods (plus `+`, `*` and `.reshape` on the backend's own
array type, which torch and MLX arrays both have). A backend may fuse several of them into
one kernel; the graph does not care. Arrays carry a batch dimension first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.quant import QuantTensor

Array = Any  # the backend's own array type (torch.Tensor, mx.array)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding on the first `dim` channels of each head, NeoX (half-split) pairing."""

    dim: int
    theta: float


@dataclass
class Step:
    """Where one forward call sits in the sequence.

    `positions` is a backend int array (B, T) so a decode step can be captured and replayed;
    `start`/`n_tokens` are the same facts as host ints for eager backends that slice.
    """

    positions: Array
    start: int
    n_tokens: int


class KVStorage(ABC):
    """A backend's storage for a full K/V cache: one K and one V buffer per layer,
    allocated once at a fixed capacity."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes actually held by the storage arrays."""


class Backend(ABC):
    name: str
    device: str

    # -- weights -------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, qt: QuantTensor) -> Any:
        """Repack a 2-D weight once at load; it stays quantized on the device."""

    @abstractmethod
    def prepare_vector(self, values: np.ndarray) -> Array:
        """A small float32 1-D tensor (norm weight, bias) on the device."""

    @abstractmethod
    def weight_bytes(self, w: Any) -> int:
        """Bytes a prepared weight holds on the device."""

    @abstractmethod
    def weight_layout(self, w: Any) -> str:
        """A short description of how a prepared weight is stored and multiplied."""

    # -- graph ops -----------------------------------------------------------------------
    @abstractmethod
    def embed(self, table: Any, ids: Array) -> Array:
        """(B, T) ids -> (B, T, D) rows of a (possibly quantized) table."""

    @abstractmethod
    def linear(self, x: Array, w: Any, bias: Array | None = None) -> Array:
        """x (B, T, K) @ W.T (+ bias) -> (B, T, N)."""

    @abstractmethod
    def rms_norm(self, x: Array, w: Array, eps: float) -> Array: ...

    @abstractmethod
    def rope(self, x: Array, positions: Array, spec: RopeSpec) -> Array:
        """x (B, T, H, Dh), positions (B, T)."""

    @abstractmethod
    def attention(self, q: Array, k: Array, v: Array, kv: KVStorage, layer: int,
                  step: Step, scale: float) -> Array:
        """Write k, v (B, T, Hkv, Dh) into the cache at the step's positions, then attend
        causally from q (B, T, H, Dh) over everything cached up to them. -> (B, T, H*Dh)."""

    @abstractmethod
    def swiglu(self, gate: Array, up: Array) -> Array: ...

    @abstractmethod
    def take_positions(self, x: Array, index: np.ndarray) -> Array:
        """x (B, T, D) -> (B, len(index), D): the positions whose logits are wanted."""

    # -- cache, sampling, transfers ------------------------------------------------------
    @abstractmethod
    def alloc_kv(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int,
                 head_dim: int) -> KVStorage: ...

    @abstractmethod
    def kv_bytes_per_element(self) -> int: ...

    @abstractmethod
    def ids(self, ids: np.ndarray) -> Array:
        """Host int array -> backend int array."""

    @abstractmethod
    def sample(self, logits: Array, params: Any, history: Array, rng: Any) -> int:
        """Pick the next token from (1, V) logits on the device; only the id comes back."""

    @abstractmethod
    def new_rng(self, seed: int | None) -> Any: ...

    @abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray: ...

    def describe(self) -> str:
        return f"{self.name} ({self.device})"
