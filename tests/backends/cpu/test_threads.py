"""DIPTYCH_THREADS sets the thread count of torch and of the numba kernels, on the thread
that loads and on a worker thread that generates (numba's count is per thread). The probe
runs in a fresh process: the count is fixed once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diptych.backends.torch.cpu.threads import physical_cores, requested_threads
from diptych.errors import InvalidArgumentError

# A CPU backend, then a Q8_0 linear run on the main thread and on a worker thread; prints
# the counts torch and numba report on each.
PROBE = """
import json, threading
import numpy as np, numba, torch
from gguf import GGMLQuantizationType as T
from diptych.backends import select
from diptych.quant import QuantTensor
from diptych.quant.quantize import quantize_rows

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


# The OpenMP wait policy in the environment when torch is imported (what torch's and numba's
# libgomp read once), through select() as load() goes.
SPIN_PROBE = """
import os, sys
seen = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))

sys.meta_path.insert(0, Watch())
from diptych.backends import select
select("torch", "cpu")
print(seen[-1])
"""


@pytest.mark.parametrize("user, expected", [({}, "PASSIVE"),
                                            ({"OMP_WAIT_POLICY": "active"}, "active"),
                                            ({"GOMP_SPINCOUNT": "5"}, "None")])
def test_idle_openmp_workers_sleep_unless_the_user_chose(user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected]
