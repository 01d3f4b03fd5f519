"""The C allocator while training runs (glibc only; elsewhere nothing changes).

glibc keeps freed blocks in its heaps (its mmap threshold rises with each big block freed,
and threads get arenas of their own), so a training step's transient activations,
dequantized tiles and gradients pile up as resident memory, and the heaps fragment.
`hand_back_freed_memory` fixes the mmap threshold (every block from there up is its own
mapping, returned to the system when freed) and the arenas at two; these are settings of
the whole process and stay after training ends. `trim` returns the heaps' free pages
(called after each forward pass and between updates).

The threshold trades page faults for fragmentation: a fresh mapping is faulted in page by
page each time it is used, and a product's output and oneDNN's scratch buffers are fresh
blocks in every call (below 4 MiB, a bf16 product of SmolLM2's FFN ran three times slower:
3.0 ms instead of 0.9), while blocks kept in the heap are reused but leave holes that
raise the peak. So the (tokens, width) arrays of attention, up to twice a (tokens,
d_model) fp32 array, stay in the heap (at least 4 MiB, at most glibc's 32 MiB), and the
wider FFN arrays are mappings. BENCHMARKS.md has the time and peak each setting gave.
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MIN_THRESHOLD, MAX_THRESHOLD = 4 << 20, 32 << 20


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None  # not glibc: its allocator, its rules


def hand_back_freed_memory(activation_bytes: int = 0) -> None:
    """Freed blocks from twice `activation_bytes` (the bytes of one (tokens, d_model) fp32
    array of a micro-batch), at least 4 MiB and at most 32 MiB, go back to the system
    (process-wide)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, min(MAX_THRESHOLD, max(MIN_THRESHOLD,
                                                               2 * activation_bytes)))
        libc.mallopt(_M_ARENA_MAX, 2)


def trim() -> None:
    """Return the heaps' free pages to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
