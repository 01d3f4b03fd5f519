"""The cache slot policy: which slot each position writes and which keys each query sees.

Backends only write and attend (backends/base.py `CacheView`); this module decides, once
per step and per kind of layer (layers with the same LayerCacheSpec share one view):
- full and MLA caches: position p lives in slot p;
- a sliding-window ring of S slots: position p lives in slot p % S, so after positions
  0..end-1 are written slot s holds the latest p < end with p = s (mod S). A query at t sees
  the keys at t - window < p <= t. Slots beyond the last position written (after a rollback)
  read as positions at least S back, outside every window as long as the rollback stayed
  within the ring's spare slots (cache.py `layer_specs`).
"""

from __future__ import annotations

import numpy as np

from diptych.backends.base import CacheView, LayerCacheSpec


def slot_positions(spec: LayerCacheSpec, end: int) -> np.ndarray:
    """The token position each slot holds once positions 0..end-1 are written (-1: empty)."""
    s = np.arange(spec.slots)
    pos = end - 1 - ((end - 1 - s) % spec.slots)
    return np.where(pos >= 0, pos, -1)


def visible(spec: LayerCacheSpec, start: int, end: int):
    """(n_keys, mask) for queries start..end-1: they attend over the first n_keys slots, and
    mask is None (each sees all of them), "causal" (query i sees the first
    n_keys - n + i + 1) or a (n, n_keys) bool array."""
    n_keys = min(end, spec.slots)
    if spec.window and end > spec.window:
        pos = slot_positions(spec, end)[:n_keys]
        t = np.arange(start, end)[:, None]
        return n_keys, (pos >= 0) & (pos <= t) & (t - pos < spec.window)
    return n_keys, None if end - start == 1 else "causal"


class SlotPolicy:
    """The views of one cache's layers; layers with the same spec (a kind) share one."""

    def __init__(self, specs: list[LayerCacheSpec]):
        self.specs = specs
        self.kinds = list(dict.fromkeys(specs))

    def arrays(self, backend, start: int, n: int, batch: int = 1) -> tuple:
        """Per kind, the slots a step of n tokens from `start` writes (batch, n) and, for
        rings, the position each slot holds after the write (batch, slots), as backend
        arrays: what a captured step takes as inputs (full caches: None, slot s holds
        position s). Every row of a batch is at the same positions."""
        def rows(a):
            return backend.ids(np.broadcast_to(a, (batch, a.shape[-1])))

        out = []
        for spec in self.kinds:
            pos = np.arange(start, start + n)
            if spec.window:
                out += [rows(pos % spec.slots), rows(slot_positions(spec, start + n))]
            else:
                out += [rows(pos), None]
        return tuple(out)

    def views(self, arrays: tuple, start: int, n: int) -> list[CacheView]:
        """Each layer's view of the step whose `arrays` are given."""
        by_kind = {}
        for i, spec in enumerate(self.kinds):
            n_keys, mask = visible(spec, start, start + n)
            by_kind[spec] = CacheView(arrays[2 * i], arrays[2 * i + 1], n_keys, mask)
        return [by_kind[s] for s in self.specs]
