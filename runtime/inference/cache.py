"""The runtime side of the KV cache: its layout, which token ids it holds, what it costs.

Storage is the backend's, allocated once: per layer a full buffer of `capacity` slots, a
ring buffer for sliding-window layers, or MLA's latent buffer (cache kinds: LayerCacheSpec).
This object knows the ids whose K/V are stored, so a new prompt reuses the longest common
prefix of token ids (never re-tokenized text) and drops the rest in place. Which slot each
position writes and which keys each query sees is slots.py's; when to snapshot and restore
is the caller's (engine.py).
"""

from __future__ import annotations

from diptych.backends.base import LayerCacheSpec

from diptych.model.config import ModelConfig
from diptych.errors import ContextOverflowError, InvalidArgumentError


def layer_specs(cfg: ModelConfig, capacity: int, n_batch: int,
                max_rollback: int = 0) -> list[LayerCacheSpec]:
    """Each layer's cache kind and size for a context of `capacity` tokens fed in chunks of
    at most `n_batch`, any of which may be rolled back by up to `max_rollback` tokens (a ring
    holds window - 1 + n_batch + max_rollback slots: whole windows per chunk, and stale
    slots after a rollback lie outside every window)."""
    specs = []
    for i in range(cfg.n_layers):
        if cfg.mla:
            m = cfg.mla
            specs.append(LayerCacheSpec(capacity, 1, m.kv_lora_rank + m.qk_rope,
                                        v_from_k=m.kv_lora_rank))
        elif cfg.is_window_layer(i):
            w = cfg.sliding_window
            specs.append(LayerCacheSpec(min(capacity, w - 1 + n_batch + max_rollback),
                                        cfg.n_kv_heads, cfg.head_dim, window=w))
        else:
            specs.append(LayerCacheSpec(capacity, cfg.n_kv_heads, cfg.head_dim))
    return specs


def cache_bytes(specs: list[LayerCacheSpec], bytes_per_element: int, batch: int = 1) -> int:
    return sum(s.slots * s.values_per_slot for s in specs) * bytes_per_element * batch


def bytes_per_token(cfg: ModelConfig, bytes_per_element: int) -> tuple[int, int]:
    """(bytes each token adds, fixed bytes of the sliding-window rings at n_batch=1):
    full and MLA layers grow with the context, ring buffers do not."""
    specs = layer_specs(cfg, 1 << 30, 1)
    grow = sum(s.values_per_slot for s in specs if not s.window) * bytes_per_element
    fixed = sum(s.slots * s.values_per_slot for s in specs if s.window) * bytes_per_element
    return grow, fixed


class KVCache:
    """One sequence's cache: the backend storage and the ids it holds.

    `rollback(n)` drops the last n <= max_rollback tokens in place on every cache kind (a
    speculative step's rejected draft); `truncate(length)` drops more where the rings still
    hold what the shorter sequence needs (`can_truncate`), and a caller that wants longer
    rewinds keeps `snapshot()`s of the rings to `restore`."""

    def __init__(self, backend, cfg: ModelConfig, capacity: int, n_batch: int,
                 max_rollback: int = 0, batch: int = 1):
        self.capacity = capacity
        self.max_rollback = max_rollback
        self.specs = layer_specs(cfg, capacity, n_batch, max_rollback)
        self.storage = backend.alloc_kv(self.specs, batch)
        self.tokens: list[int] = []
        self.rings = [i for i, s in enumerate(self.specs) if s.window and s.slots < capacity]

    @staticmethod
    def bytes_needed(cfg: ModelConfig, capacity: int, bytes_per_element: int, n_batch: int,
                     max_rollback: int = 0, batch: int = 1) -> int:
        return cache_bytes(layer_specs(cfg, capacity, n_batch, max_rollback),
                           bytes_per_element, batch)

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
                f"tokens; load the model with a larger n_ctx (--n-ctx) or shorten the input")

    def common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def rollback(self, n: int) -> None:
        """Forget the last n tokens, in place; n <= max_rollback (chosen at allocation)."""
        if not 0 <= n <= min(self.max_rollback, self.length):
            raise InvalidArgumentError(
                f"cannot roll back {n} tokens: the cache holds {self.length} and was "
                f"allocated for rollbacks of up to {self.max_rollback}")
        del self.tokens[self.length - n:]

    def can_truncate(self, length: int) -> bool:
        """Whether dropping everything after `length` tokens leaves every key the shorter
        sequence sees in place: a ring that has wrapped has overwritten keys it needs again
        once the drop goes back further than its spare slots (slots - window + 1)."""
        lost = self.length - length
        return all(self.length <= s.slots or lost <= s.slots - s.window + 1
                   for s in (self.specs[i] for i in self.rings))

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (`can_truncate(length)`)."""
        del self.tokens[length:]

    def snapshot(self):
        """(ids, copy of the ring layers' slots in use) as they are now, for `restore`; None
        without rings or tokens. A ring that has not wrapped holds positions 0..n-1 in its
        first n slots (slots.py): only those are copied, so a short chat's snapshots do not
        make the whole ring resident."""
        if not self.rings or not self.tokens:
            return None
        n = len(self.tokens)
        return list(self.tokens), self.storage.snapshot(
            [(i, min(n, self.specs[i].slots)) for i in self.rings])

    def restore(self, snapshot) -> None:
        ids, copy = snapshot
        self.storage.restore(copy)
        self.tokens = list(ids)

    def reset(self) -> None:
        self.tokens.clear()

    def commit(self, ids: list[int]) -> None:
        """Record ids whose K/V a completed forward pass has written."""
        self.tokens.extend(ids)
