"""The runtime side of the KV cache: its layout, which token ids it holds, what it costs.

Storage is the backend's, allocated once: per layer a full buffer of `capacity` slots, a
ring buffer for sliding-window layers, or MLA's latent buffer (cache kinds: LayerCacheSpec).
This object knows the ids whose K/V are stored, so a new prompt reuses the longest common
prefix of token ids (never re-tokenized text) and rewinds the rest in place.
"""

from __future__ import annotations

from diptych.backends.base import LayerCacheSpec

from diptych.model.config import ModelConfig
from diptych.errors import ContextOverflowError


def layer_specs(cfg: ModelConfig, capacity: int, n_batch: int) -> list[LayerCacheSpec]:
    """Each layer's cache kind and size for a context of `capacity` tokens fed in chunks of
    at most `n_batch` (a ring holds window - 1 + n_batch slots: whole windows per chunk)."""
    specs = []
    for i in range(cfg.n_layers):
        if cfg.mla:
            m = cfg.mla
            specs.append(LayerCacheSpec(capacity, 1, m.kv_lora_rank + m.qk_rope,
                                        v_from_k=m.kv_lora_rank))
        elif cfg.is_window_layer(i):
            w = cfg.sliding_window
            specs.append(LayerCacheSpec(min(capacity, w - 1 + n_batch), cfg.n_kv_heads,
                                        cfg.head_dim, window=w))
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
    MAX_SNAPSHOTS = 3  # what a chat needs: regenerate, edit and resend, and the latest

    def __init__(self, backend, cfg: ModelConfig, capacity: int, n_batch: int, batch: int = 1):
        self.capacity = capacity
        self.specs = layer_specs(cfg, capacity, n_batch)
        self.storage = backend.alloc_kv(self.specs, batch)
        self.tokens: list[int] = []
        # ring layers can wrap; their state at a few earlier lengths is kept so that a long
        # rewind (regenerate, edit and resend) need not re-feed the whole conversation
        self.rings = [i for i, s in enumerate(self.specs) if s.window and s.slots < capacity]
        self.snapshots: list[tuple[list[int], object]] = []

    @staticmethod
    def bytes_needed(cfg: ModelConfig, capacity: int, bytes_per_element: int, n_batch: int,
                     batch: int = 1) -> int:
        return cache_bytes(layer_specs(cfg, capacity, n_batch), bytes_per_element, batch)

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

    def snapshot(self) -> None:
        """Keep a copy of the ring layers as they are now (a no-op without rings)."""
        if not self.rings or not self.tokens:
            return
        if any(ids == self.tokens for ids, _ in self.snapshots):
            return
        copy = self.storage.snapshot(self.rings)
        self.snapshots = (self.snapshots + [(list(self.tokens), copy)])[-self.MAX_SNAPSHOTS:]

    def rewind(self, length: int) -> int:
        """Forget everything after the first `length` tokens (their slots are overwritten
        later); returns the length actually kept, which the caller re-feeds from.

        A ring that has wrapped has overwritten keys a shorter sequence needs again once
        the rewind goes back further than its spare slots (slots - window + 1). Then the
        latest snapshot at or before `length` (of this same token sequence) is restored,
        or the cache restarts empty: never attention over wrong keys."""
        length = min(length, self.length)
        if not self._in_place(length):
            usable = [(len(ids), copy) for ids, copy in self.snapshots
                      if len(ids) <= length and self.tokens[:len(ids)] == ids]
            if usable:
                length, copy = max(usable, key=lambda u: u[0])
                self.storage.restore(copy)
            else:
                length = 0
        del self.tokens[length:]
        return length

    def _in_place(self, length: int) -> bool:
        lost = self.length - length
        return all(self.length <= s.slots or lost <= s.slots - s.window + 1
                   for s in (self.specs[i] for i in self.rings))

    def commit(self, ids: list[int]) -> None:
        """Record ids whose K/V a completed forward pass has written."""
        self.tokens.extend(ids)
