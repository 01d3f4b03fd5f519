"""One thread budget for torch and numba, so the two pools do not oversubscribe the cores."""

from __future__ import annotations

import os
import threading

import psutil

from diptych.errors import InvalidArgumentError

_done = False


# How long an idle OpenMP worker spins before it sleeps, in libgomp's spin iterations (a few
# tens of microseconds): long enough to bridge the gaps between a decode step's kernels,
# short enough that a worker with nothing to do sleeps almost at once.
SPIN_COUNT = 3000


def bounded_spin() -> None:
    """Idle OpenMP workers spin SPIN_COUNT iterations, then sleep (unless the user chose a
    wait policy or spin count). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) made every one
    of a decode step's ~100 kernel launches wake a sleeping worker: two threads decoded
    slower than one. libgomp's default spins for milliseconds, which takes the core from
    the calling thread's serial work and from other processes; where a core is contended
    all the same, `ThreadGovernor` drops the kernels to one thread. Must run before torch
    or numba load their OpenMP runtime, which reads it once."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


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
    # numba's first set_num_threads starts its OpenMP pool, which sets the process's OpenMP
    # thread count to numba's maximum where torch has already run an op: torch's goes last
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    _done = True


def set_numba_threads(n: int) -> None:
    """Threads for the numba kernels (numba keeps this per calling thread)."""
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


_tls = threading.local()


def sync_numba_threads(n: int) -> None:
    """numba's thread count is per calling thread (a generation worker thread starts at
    numba's default): make it n, torch's intra-op count, or one while the governor says the
    cores are contended; checked cheaply on every kernel call."""
    if GOVERNOR.contended:
        n = 1
    if getattr(_tls, "n", 0) != n:
        set_numba_threads(n)
        _tls.n = n


class ThreadGovernor:
    """Whether the kernels should run on one thread because the cores are contended.

    A parallel kernel waits for its slowest thread: when another process holds one of two
    cores, every launch waits for a descheduled worker, and decode ran at half the speed
    of one thread. The sign is the calling thread's CPU time falling behind the wall time
    of its forwards (it is off its core, or waiting on a worker that is). Over each
    WINDOW forwards: below LOW, the kernels drop to one thread. They try all threads again
    after RETRY forwards, and after twice as many each time the trial finds the cores still
    contended (up to MAX_RETRY), so that a machine that stays busy pays for few trials.
    Forwards longer than LONG seconds are not counted: long prompts' chunks, and first
    calls that wait for kernels compiling in other processes, say nothing about the cores."""

    WINDOW, LOW, RETRY, MAX_RETRY, LONG = 8, 0.7, 64, 4096, 0.5

    def __init__(self):
        self.contended = False
        self._retry = self.RETRY
        self._trial = False  # this window follows a contended spell
        self._n = self._since = 0
        self._wall = self._cpu = 0.0

    def record(self, wall: float, cpu: float) -> None:
        """One forward's wall and calling-thread CPU seconds."""
        if wall > self.LONG:
            return
        if self.contended:
            self._since += 1
            if self._since >= self._retry:
                self.contended, self._trial = False, True
            return
        self._n += 1
        self._wall += wall
        self._cpu += cpu
        if self._n >= self.WINDOW:
            self.contended = self._cpu < self.LOW * self._wall
            if self.contended:
                self._retry = min(2 * self._retry, self.MAX_RETRY) if self._trial else self.RETRY
            self._trial = False
            self._n = self._since = 0
            self._wall = self._cpu = 0.0


GOVERNOR = ThreadGovernor()


def numba_threads() -> int:
    import numba

    return numba.get_num_threads()
