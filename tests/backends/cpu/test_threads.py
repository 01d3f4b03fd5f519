"""DIPTYCH_THREADS sets the thread count of torch and of the numba kernels, on the thread
that loads and on a worker thread that generates (numba's count is per thread). The probe
runs in a fresh process: the count is fixed once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diptych.backends.torch.cpu.threads import (SPIN_COUNT, ThreadGovernor, physical_cores,
                                                requested_threads)
from diptych.errors import InvalidArgumentError

# A torch op, a CPU backend, then a Q8_0 linear run on the main thread and on a worker thread; prints
# the counts torch and numba report on each.
PROBE = """
import json, threading
import numpy as np, numba, torch
from gguf import GGMLQuantizationType as T
from diptych.backends import select
from diptych.quant import QuantTensor
from diptych.quant.quantize import quantize_rows

# the caller's own torch work before the backend starts its pools, large enough to run
# in torch's parallel region (its OpenMP pool starts; a tiny op runs inline)
torch.ones(1 << 20) + 1
be = select("torch", "cpu")
w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
lin = be.prepare(QuantTensor("w", T.Q8_0, (64, 64), quantize_rows(w, T.Q8_0)))
x = torch.ones(1, 64)
seen = {}

def run(where):
    be.linear(x, lin)
    seen[where] = [torch.get_num_threads(), numba.get_num_threads()]

run("main")
th = threading.Thread(target=run, args=("worker",))
th.start()
th.join()
print(json.dumps(seen))
"""


def test_torch_and_numba_follow_diptych_threads():
    # one thread where the default would be one per core (CI has two)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["DIPTYCH_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["main"] == [1, 1]
    assert got["worker"] == [1, 1]


def test_the_thread_count_is_read_and_checked(monkeypatch):
    monkeypatch.delenv("DIPTYCH_THREADS", raising=False)
    assert requested_threads() == physical_cores()
    monkeypatch.setenv("DIPTYCH_THREADS", "0")
    assert requested_threads() == physical_cores()
    monkeypatch.setenv("DIPTYCH_THREADS", " 3 ")
    assert requested_threads() == 3
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("DIPTYCH_THREADS", bad)
        with pytest.raises(InvalidArgumentError, match="DIPTYCH_THREADS"):
            requested_threads()


# The OpenMP wait policy and spin count in the environment when torch is imported (what
# torch's and numba's libgomp read once), through select() as load() goes.
SPIN_PROBE = """
import os, sys
seen = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            seen.append(f'{os.environ.get("OMP_WAIT_POLICY")},{os.environ.get("GOMP_SPINCOUNT")}')

sys.meta_path.insert(0, Watch())
from diptych.backends import select
select("torch", "cpu")
print(seen[-1])
"""


@pytest.mark.parametrize("user, expected", [({}, f"None,{SPIN_COUNT}"),
                                            ({"OMP_WAIT_POLICY": "active"}, "active,None"),
                                            ({"GOMP_SPINCOUNT": "5"}, "None,5")])
def test_idle_openmp_workers_spin_briefly_unless_the_user_chose(user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected]


def _fed(governor, windows, wall, cpu):
    """Record `windows` windows of forwards of `wall` wall and `cpu` CPU seconds each."""
    for _ in range(windows * governor.WINDOW):
        governor.record(wall, cpu)


def test_the_governor_drops_to_one_thread_while_the_cores_are_contended():
    """A window of forwards in which the calling thread got under LOW of the wall time
    drops the kernels to one thread; RETRY forwards later they try all threads again, and
    stay there while the thread keeps its core."""
    g = ThreadGovernor()
    _fed(g, 3, 0.010, 0.0098)                 # a quiet machine
    assert not g.contended
    _fed(g, 1, 0.010, 0.005)                  # half the wall time off the core
    assert g.contended
    for _ in range(g.RETRY - 1):
        g.record(0.010, 0.010)
    assert g.contended                        # one thread until RETRY forwards have passed
    g.record(0.010, 0.010)
    assert not g.contended
    _fed(g, 2, 0.010, 0.0095)
    assert not g.contended
    g.record(0.3, 0.03)                       # one stalled forward weighs by its time
    _fed(g, 1, 0.010, 0.010)
    assert g.contended


def test_long_forwards_are_not_counted():
    """A prompt's chunk or a first call waiting on a compile (seconds, little CPU on the
    calling thread) leaves the governor as it was."""
    g = ThreadGovernor()
    for _ in range(3 * g.WINDOW):
        g.record(g.LONG * 4, 0.01)
    assert not g.contended


def _forwards_until_trial(g):
    n = 0
    while g.contended:
        g.record(0.010, 0.010)
        n += 1
    return n


def test_failed_trials_back_off_and_a_good_one_resets():
    """On a machine that stays busy each trial of all threads comes twice as late as the
    last (up to MAX_RETRY forwards); a trial that finds the cores free starts over."""
    g = ThreadGovernor()
    _fed(g, 1, 0.010, 0.004)
    waits = []
    for _ in range(9):
        waits.append(_forwards_until_trial(g))
        _fed(g, 1, 0.010, 0.004)              # the trial window: still contended
    assert waits[:4] == [g.RETRY, 2 * g.RETRY, 4 * g.RETRY, 8 * g.RETRY]
    assert waits[-1] == g.MAX_RETRY
    _forwards_until_trial(g)
    _fed(g, 4, 0.010, 0.0099)                 # a good trial, then a quiet spell
    _fed(g, 1, 0.010, 0.004)                  # contended again: the first wait is RETRY
    assert _forwards_until_trial(g) == g.RETRY


def test_a_contended_governor_runs_the_kernels_on_one_thread(monkeypatch):
    import numba

    from diptych.backends.torch.cpu import threads

    g = ThreadGovernor()
    monkeypatch.setattr(threads, "GOVERNOR", g)
    monkeypatch.setattr(threads._tls, "n", 0, raising=False)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    before = numba.get_num_threads()
    try:
        threads.sync_numba_threads(2)
        assert numba.get_num_threads() == 2
        _fed(g, 1, 0.010, 0.001)
        threads.sync_numba_threads(2)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)  # and monkeypatch puts back the cached count
