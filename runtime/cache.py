"""The runtime side of the KV cache: which token ids it holds, and how much it costs.

Storage is the backend's (allocated once at `capacity`, the context length); this object
knows the ids whose K/V are stored, so a new prompt reuses the longest common prefix of
token ids (never re-tokenized text) and rewinds the rest in place.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import ContextOverflowError


class KVCache:
    def __init__(self, backend, cfg: ModelConfig, capacity: int, batch: int = 1):
        self.capacity = capacity
        self.storage = backend.alloc_kv(cfg.n_layers, batch, capacity, cfg.n_kv_heads,
                                        cfg.head_dim)
        self.tokens: list[int] = []

    @staticmethod
    def bytes_needed(cfg: ModelConfig, capacity: int, bytes_per_element: int, batch: int = 1) -> int:
        return cfg.kv_elements_per_token() * bytes_per_element * capacity * batch

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def check_fits(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise ContextOverflowError(
                f"{self.length + n_new} tokens do not fit in the context of {self.capacity} "
                f"tokens; load the model with a larger n_ctx or shorten the input")

    def common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def rewind(self, length: int) -> None:
        """Forget everything after the first `length` tokens (their slots are overwritten)."""
        del self.tokens[length:]

    def commit(self, ids: list[int]) -> None:
        """Record ids whose K/V a completed forward pass has written."""
        self.tokens.extend(ids)
