"""Python's cyclic garbage collector paused over a burst of allocations that mostly live on.

A collection of the oldest generation walks every container object in the process, and
torch and numba alone hold hundreds of thousands of them. Building a vocabulary, a model's
weights or numba's typing and lowering registries (built when a process first compiles a
kernel: ~70,000 objects) allocates enough to set off such collections, which find nothing
to free and cost tens of milliseconds each (BENCHMARKS.md). Pausing the collector over
these bursts (the tokenizer's build, `LoadPlan.engine`, and every model pass:
`Sequence.step` and `forward`) defers that work to the collector's ordinary schedule
afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC off for the block (process-wide); on again after it unless it was off
    before (so nested blocks and a caller's own gc.disable() are respected)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
