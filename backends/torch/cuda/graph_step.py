"""Decode steps replayed as CUDA graphs: the capture and replay that `CudaBackend.compile_step`
returns."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GraphStep:
    """Calls fn(*args) through a CUDA graph captured at the first call per input signature.

    Tensor arguments are the static input slots: each call copies its values into them and
    replays the graph. Everything else fn touches (weights, the KV cache) must be the same
    persistent tensors on every call, and non-tensor arguments must not change what fn
    computes on this backend (they are frozen at capture: CudaBackend's decode reads
    positions and cache slots from device arrays, never a CacheView's host facts, for
    steps of up to DECODE_MAX_T tokens). The returned tensor is the graph's
    static output: overwritten by the next call, so consume (sample) it first.
    """

    def __init__(self, fn, device: torch.device):
        self.fn = fn
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a.__class__
                    for a in args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        graph, slots, out = entry
        for slot, a in zip(slots, args):
            if isinstance(a, torch.Tensor):
                slot.copy_(a, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, args):
        """(graph, input slots, output), or None when fn cannot be captured."""
        slots = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compiles the kernels; rewrites the same K/V slots
            self.fn(*slots)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*slots)
        except RuntimeError as e:  # a host sync inside fn
            log.warning("decode step not capturable, running it eagerly: %s",
                        str(e).splitlines()[0])
            return None
        return graph, slots, out
