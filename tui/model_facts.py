"""What the status bar says about a loaded model."""

from __future__ import annotations

from collections import Counter

import psutil


def quant_summary(model) -> str:
    """The tensor types holding at least 5% of the weights' bytes, largest first: 'Q4_1/Q8_0'."""
    size = Counter()
    for t in model.gguf.tensors.values():
        size[t.type_name] += t.nbytes
    total = sum(size.values()) or 1
    return "/".join(name for name, n in size.most_common() if n / total >= 0.05)


def memory_in_use() -> int:
    """Bytes: the process's resident memory (weights, cache and the app itself)."""
    return psutil.Process().memory_info().rss
