"""Decode steps replayed from a tape of their kernel calls: what `CpuBackend.compile_step`
returns, the CPU's counterpart of a CUDA graph.

A decode step of a small model is a few hundred small kernel calls, and the graph's Python
between them (torch's tensor conversions, the allocations, the checks) costs as much as the
kernels do. The first step of each input shape runs the graph while every kernel call is
recorded with its arguments: numpy arrays that are the step's inputs, weights, the KV cache,
or a buffer an earlier call wrote. Later steps copy their inputs into the recorded input
arrays and make the same calls, in order, on the same buffers: data flows through them as
it did in the recorded step, and nothing else of the graph runs.

A step is recorded only if every activation a call reads is an input or (a view of) a buffer
that an earlier recorded call wrote, and the step's result is one of those buffers. A torch
op in the graph, or an op without a taped form (expert routing, MLA's per-head products),
makes a fresh array that breaks the chain; an op that would change recorded buffers in
place outside the tape (LoRA pairs adding into a linear's output) says so (`untaped`).
Such steps run eagerly, every time.

Calls that need per-step facts read them from the input arrays (positions, cache slots, the
positions a ring's slots hold), never from the recorded step's host values.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .threads import sync_numba_threads

_local = threading.local()


def recording() -> bool:
    """Whether this thread is recording a step (ops then take their taped form)."""
    return getattr(_local, "tape", None) is not None


def run(fn, *args, reads=(), writes=()):
    """fn(*args), recorded on the tape this thread is recording, if any. `reads`: the
    activation arrays fn reads (checked to come from the tape); `writes`: the buffers it
    writes, which later calls may read."""
    tape = getattr(_local, "tape", None)
    if tape is not None:
        tape.add(fn, args, reads, writes)
    return fn(*args)


def copy(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of x, made again on every replay of a taped step."""
    out = np.empty(x.shape, x.dtype)
    run(np.copyto, out, x, reads=(x,), writes=(out,))
    return out


def untaped() -> None:
    """The step being recorded (if any) runs something the tape cannot replay: an op that
    may write recorded buffers in place (a linear's LoRA pairs add into its output) or the
    cache outside the tape. Such a step runs through the graph."""
    tape = getattr(_local, "tape", None)
    if tape is not None:
        tape.complete = False


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class Tape:
    """The calls of one recorded step, and the memory they may read."""

    def __init__(self, inputs: list[np.ndarray]):
        self.calls: list[tuple] = []
        self.complete = True
        self._spans: list[tuple[int, int]] = []
        for a in inputs:
            self._own(a)

    def _own(self, a: np.ndarray) -> None:
        self._spans.append((_address(a), _address(a) + a.nbytes))

    def owns(self, a: np.ndarray) -> bool:
        p = _address(a)   # newest first: a call mostly reads what a recent call wrote
        return any(lo <= p < hi for lo, hi in reversed(self._spans))

    def add(self, fn, args, reads, writes) -> None:
        if not all(self.owns(a) for a in reads):
            self.complete = False
        for a in writes:
            self._own(a)
        self.calls.append((fn, args))

    def replay(self) -> None:
        for fn, args in self.calls:
            fn(*args)


class StepTape:
    """fn(start, tokens, positions, *cache view arrays) replayed from a tape recorded at
    its first call per input shape (see the module docstring).
    The returned logits are a copy: the tape's own output buffer is rewritten by the next
    step."""

    def __init__(self, fn):
        self.fn = fn
        self._tapes: dict[tuple, tuple | None] = {}

    def __call__(self, start, *arrays):
        key = tuple(None if a is None else tuple(a.shape) for a in arrays)
        entry = self._tapes.get(key, False)
        if entry is False:
            entry, out = self._record(start, arrays)
            self._tapes[key] = entry
            return out
        if entry is None:
            return self.fn(start, *arrays)
        tape, inputs, out = entry
        for slot, a in zip(inputs, arrays):
            if slot is not None:
                slot.copy_(a)
        sync_numba_threads(torch.get_num_threads())
        tape.replay()
        return out.clone()

    def _record(self, start, arrays):
        """(the tape entry, or None for an eager step; this step's output)."""
        inputs = [None if a is None else a.clone() for a in arrays]
        tape = Tape([a.numpy() for a in inputs if a is not None])
        _local.tape = tape
        try:
            out = self.fn(start, *inputs)
        finally:
            _local.tape = None
        if not (tape.complete and isinstance(out, torch.Tensor) and tape.owns(out.numpy())):
            return None, out
        return (tape, inputs, out), out.clone()
