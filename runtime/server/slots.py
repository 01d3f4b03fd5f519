"""The server's cache slots: one engine `Sequence` each, matched to requests by prefix.

OpenAI requests carry no conversation id, so a request goes to the free slot whose cache
holds the longest common prefix of its token ids (the second turn of a chat finds its first
turn there and prefills only the new tail); among equals, and when nothing matches, the
least recently used slot is taken, which is the one whose cache is overwritten. With a
draft model, each slot has a draft Sequence of its own too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from diptych.errors import OutOfMemoryError
from diptych.inference.engine import Engine, Sequence


@dataclass
class Slot:
    index: int
    sequence: Sequence
    draft: Sequence | None = None   # the draft model's cache for this slot
    busy: bool = False
    last_used: int = 0


def _sequences(engine: Engine, n: int, what: str) -> list[Sequence]:
    """The engine's first sequence and n - 1 more, after checking they fit."""
    need, room, mib = (n - 1) * engine.sequence_bytes, engine.cache_room(), 1 << 20
    if need > room:
        raise OutOfMemoryError(
            f"{n} slots need {n - 1} more {what}caches of "
            f"{engine.sequence_bytes / mib:.1f} MiB each ({need / mib:.0f} MiB) but "
            f"{max(room, 0) / mib:.0f} MiB is available; serve with a smaller --parallel or "
            f"--n-ctx")
    return [engine.main] + [engine.open_sequence() for _ in range(n - 1)]


class SlotPool:
    """`n` slots over `engine`: its first sequence and n - 1 more, each with a cache of the
    engine's n_ctx (opening them checks the memory: OutOfMemoryError when they do not fit),
    and as many over a `draft` model's engine. Used from the scheduler's thread only."""

    def __init__(self, engine: Engine, n: int, draft: Engine | None = None):
        sequences = _sequences(engine, n, "")
        drafts = _sequences(draft, n, "draft ") if draft is not None else [None] * n
        self.slots = [Slot(i, s, d) for i, (s, d) in enumerate(zip(sequences, drafts))]
        self._clock = itertools.count(1)

    def acquire(self, ids: list[int]) -> Slot | None:
        """The free slot to run `ids` in (now busy), or None when every slot is busy."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        slot = max(free, key=lambda s: (s.sequence.cache.common_prefix(ids), -s.last_used))
        slot.busy = True
        slot.last_used = next(self._clock)
        return slot

    def release(self, slot: Slot) -> None:
        slot.busy = False
        slot.last_used = next(self._clock)

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def __len__(self) -> int:
        return len(self.slots)
