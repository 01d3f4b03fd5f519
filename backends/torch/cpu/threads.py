"""One thread budget for torch and numba, so the two pools do not oversubscribe the cores."""

from __future__ import annotations

import os

import psutil

_done = False


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def configure_threads() -> None:
    """torch and numba both use the physical core count (or $DIPTYCH_THREADS)."""
    global _done
    if _done:
        return
    import numba
    import torch

    n = int(os.environ.get("DIPTYCH_THREADS", 0)) or physical_cores()
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(n)
    numba.set_num_threads(n)
    _done = True


def set_numba_threads(n: int) -> None:
    """Threads for the numba kernels (numba keeps this per calling thread)."""
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def numba_threads() -> int:
    import numba

    return numba.get_num_threads()
