"""One thread budget for torch and numba, so the two pools do not oversubscribe the cores."""

from __future__ import annotations

import os
import threading

import psutil

from diptych.errors import InvalidArgumentError

_done = False


def quiet_idle_workers() -> None:
    """Idle OpenMP workers sleep at once (OMP_WAIT_POLICY=PASSIVE) unless the user chose a
    wait policy or spin count. libgomp's default spins them for milliseconds after each
    parallel region; torch and numba each bring a libgomp, and decode alternates small
    kernels with serial work, so on 2 cores shared with any other busy process the spinning
    workers took the cores from the thread with work and decode stalled for scheduler
    slices (a bounded spin did not help; BENCHMARKS.md). Must run before torch or numba
    load their OpenMP runtime, which reads it once."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def requested_threads() -> int:
    """$DIPTYCH_THREADS (unset, empty or 0: the physical core count)."""
    raw = os.environ.get("DIPTYCH_THREADS", "").strip()
    try:
        n = int(raw or 0)
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidArgumentError(f"DIPTYCH_THREADS={raw!r}: expected a number of threads "
                                   f"(0 or unset: one per physical core)")
    return n or physical_cores()


def configure_threads() -> None:
    """torch and numba both use the physical core count (or $DIPTYCH_THREADS), once per
    process: libgomp keeps the team size of its first parallel region."""
    global _done
    if _done:
        return
    import numba
    import torch

    n = min(requested_threads(), numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(n)
    numba.set_num_threads(n)
    _done = True


def set_numba_threads(n: int) -> None:
    """Threads for the numba kernels (numba keeps this per calling thread)."""
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


_tls = threading.local()


def sync_numba_threads(n: int) -> None:
    """numba's thread count is per calling thread (a generation worker thread starts at
    numba's default): make it n, torch's intra-op count, checked cheaply on every kernel
    call."""
    if getattr(_tls, "n", 0) != n:
        set_numba_threads(n)
        _tls.n = n


def numba_threads() -> int:
    import numba

    return numba.get_num_threads()
