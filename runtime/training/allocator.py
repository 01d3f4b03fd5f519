"""The C allocator while training runs (glibc only; elsewhere nothing changes).

glibc keeps freed blocks in its heaps (its mmap threshold rises with each big block freed,
and threads get arenas of their own), so a training step's transient activations,
dequantized tiles and gradients pile up as resident memory, and the heaps fragment.
`hand_back_freed_memory` fixes the mmap threshold at 1 MiB (every block from there up is
its own mapping, returned to the system when freed) and the arenas at two; these are
settings of the whole process and stay after training ends. `trim` returns the heaps'
free pages (called between updates).

The threshold trades page faults for fragmentation: a fresh mapping is faulted in page by
page each time (at 64 KiB, a third of a SmolLM2 update went to the kernel), while blocks
kept in the heap are reused but leave holes. At 4 MiB the (tokens, width) activations
stayed in the heap, and what the holes kept varied from run to run (a SmolLM2 update's
peak 823-903 MiB); at 1 MiB they are mappings too, and the peak is the same in every run
(792 MiB), for an update time within the runs' spread. BENCHMARKS.md has the time and
peak each setting gave.
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None  # not glibc: its allocator, its rules


@functools.cache
def hand_back_freed_memory() -> None:
    """Large freed blocks go back to the system (process-wide, once)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)


def trim() -> None:
    """Return the heaps' free pages to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
