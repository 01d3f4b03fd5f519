"""Run each hostile case in its own process, forked from a warm server, within hard limits.

A case that hangs, exhausts memory or crashes must not take the test run with it, and must
be told apart from one that fails cleanly. `ForkServer` starts one server process (spawned,
so it shares no threads or state with pytest) that imports diptych, runs a warm-up (first
calls are slow: kernels, caches) with torch on one thread, then forks one child per case.
The child runs under RLIMIT_AS = `MEMORY_LIMIT` and is killed after `TIME_LIMIT` seconds;
what it returned or raised comes back as an `Outcome`.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import resource
import select
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIME_LIMIT = 20.0          # seconds of wall time per case
MEMORY_LIMIT = 2 << 30     # bytes of address space per case


@dataclass
class Outcome:
    status: str                  # "returned" | "raised" | "hang" | "crashed"
    value: Any = None            # what the case returned
    error_type: str = ""         # module.qualname of what it raised
    message: str = ""
    diptych_error: bool = False  # what it raised is a DiptychError
    detail: str = ""             # traceback, or how the process ended

    def __str__(self) -> str:
        if self.status == "returned":
            return f"returned {self.value!r:.200}"
        if self.status == "raised":
            return f"raised {self.error_type}: {self.message}\n{self.detail}"
        return f"{self.status}: {self.detail}"


def assert_refused(outcome: Outcome, *names: str, error: str | None = None) -> None:
    """The case ended in a DiptychError (of class `error` if given) whose message names
    at least one of `names`."""
    assert outcome.status == "raised" and outcome.diptych_error, str(outcome)
    if error is not None:
        assert outcome.error_type.endswith(f".{error}"), str(outcome)
    assert any(n in outcome.message for n in names), \
        f"the message names none of {names}: {outcome.message}"


def assert_text(outcome: Outcome) -> None:
    assert outcome.status == "returned" and isinstance(outcome.value, str), str(outcome)


class ForkServer:
    """`run(fn, *args)` calls fn(*args) in a fresh child of a warm server process.
    `fn` and `args` must pickle (module-level functions, plain values, paths)."""

    def __init__(self, warm_up: Callable[..., None] | None = None, *args: Any):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, warm_up, args), daemon=True)
        self._process.start()
        child_conn.close()
        ready = self._conn.recv()  # the warm-up's own failure is worth seeing as it is
        if ready is not True:
            raise RuntimeError(f"the fork server did not start: {ready}")

    def run(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        self._conn.send((fn, args))
        if not self._conn.poll(TIME_LIMIT + 60):
            raise RuntimeError("the fork server stopped answering")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def _serve(conn, warm_up, args) -> None:
    # one thread everywhere, so no OpenMP/numba pool exists when children fork (a child
    # would wait forever on the pool's locks)
    for var in ("DIPTYCH_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    # numba's own scheduler: even at one thread the warm-up's parallel kernels (CPU decode
    # attention) launch numba's threading layer, and its GNU OpenMP layer terminates a
    # forked child that uses the pool its parent launched
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    try:
        if warm_up is not None:
            warm_up(*args)
    except BaseException:
        conn.send(traceback.format_exc())
        return
    conn.send(True)
    while (job := conn.recv()) is not None:
        conn.send(_fork_and_wait(*job))


def _fork_and_wait(fn, args) -> Outcome:
    read_end, write_end = os.pipe()
    stacks = tempfile.TemporaryFile()  # where a hanging child writes its stack
    pid = os.fork()
    if pid == 0:  # the child: limits, the case, its outcome down the pipe, exit
        os.close(read_end)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            faulthandler.dump_traceback_later(TIME_LIMIT - 1, file=stacks)
            data = pickle.dumps(_call(fn, args))
        except BaseException as exc:  # an outcome that does not pickle, or no limit
            data = pickle.dumps(Outcome("crashed", detail=repr(exc)))
        with os.fdopen(write_end, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_end)
    data, deadline = b"", time.monotonic() + TIME_LIMIT
    with os.fdopen(read_end, "rb", buffering=0) as pipe, stacks:
        while (left := deadline - time.monotonic()) > 0:
            if select.select([pipe], [], [], left)[0]:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            stacks.seek(0)
            return Outcome("hang", detail=f"still running after {TIME_LIMIT:g} s:\n"
                                          + stacks.read().decode(errors="replace"))
    _, status = os.waitpid(pid, 0)
    if not data:
        return Outcome("crashed", detail=f"the process ended with wait status {status}")
    return pickle.loads(data)


def _call(fn, args) -> Outcome:
    from diptych.errors import DiptychError

    try:
        return Outcome("returned", value=fn(*args))
    except BaseException as exc:
        return Outcome("raised", error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                       message=str(exc), diptych_error=isinstance(exc, DiptychError),
                       detail=traceback.format_exc(limit=-6))
