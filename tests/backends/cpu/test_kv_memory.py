"""The CPU KV cache costs memory as it is written, not when it is allocated."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest
import torch

from diptych.backends import select
from diptych.backends.base import LayerCacheSpec


def resident_bytes(t: torch.Tensor) -> int:
    """How many bytes of the pages under a contiguous tensor are in memory (mincore): the
    tensor's own pages, whatever the rest of the process holds or frees meanwhile."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    pages = -(-(t.data_ptr() + t.numel() * t.element_size() - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return int((np.frombuffer(vec, np.uint8) & 1).sum()) * page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore as Linux has it")
def test_an_allocated_cache_is_resident_only_where_written():
    be = select("torch", "cpu")
    # buffers of 64 MiB (fp32): above any malloc threshold, so each is a fresh mapping
    specs = [LayerCacheSpec(131072, 2, 64) for _ in range(2)]
    kv = be.alloc_kv(specs, 1)
    buffers = kv.k + kv.v
    assert kv.k[0].dtype == torch.float32  # tests run an fp32 cache (tests/conftest.py)
    assert kv.nbytes == 4 * 131072 * 2 * 64 * 4
    assert sum(map(resident_bytes, buffers)) < kv.nbytes // 16
    for t in buffers:
        t[:, :, :32768] = 1.0
    # a quarter of each head's slots written: a quarter of the cache resident (huge pages
    # may round each written run up by a page of 2 MiB)
    assert kv.nbytes // 4 <= sum(map(resident_bytes, buffers)) < kv.nbytes // 3
    assert not any(t[:, :, 32768:].any() for t in buffers)  # zeros where not written
