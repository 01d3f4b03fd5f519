"""The CPU KV cache costs memory as it is written, not when it is allocated."""

from __future__ import annotations

import psutil
import torch

from diptych.backends import select
from diptych.backends.base import LayerCacheSpec


def test_an_allocated_cache_is_resident_only_where_written():
    be = select("torch", "cpu")
    proc = psutil.Process()
    # buffers of 64 MiB (fp32): above any malloc threshold, so the test does not depend on
    # what earlier tests left in the heap
    specs = [LayerCacheSpec(131072, 2, 64) for _ in range(2)]
    before = proc.memory_info().rss
    kv = be.alloc_kv(specs, 1)
    assert kv.k[0].dtype == torch.float32  # tests run an fp32 cache (tests/conftest.py)
    assert kv.nbytes == 4 * 131072 * 2 * 64 * 4
    assert proc.memory_info().rss - before < kv.nbytes // 16
    for t in kv.k + kv.v:
        t[:, :, :32768] = 1.0
    assert proc.memory_info().rss - before > kv.nbytes // 5
    assert not any(t[:, :, 32768:].any() for t in kv.k + kv.v)  # zeros where not written
