"""What the status bar says about a loaded model."""

from __future__ import annotations

from collections import Counter

import psutil


def quant_summary(model) -> str:
    """The tensor types that hold most of the weights' bytes, e.g. 'Q4_1 69% + Q8_0 31%'."""
    size = Counter()
    for t in model.gguf.tensors.values():
        size[t.type_name] += t.nbytes
    total = sum(size.values()) or 1
    top = [(name, n) for name, n in size.most_common(2) if n / total >= 0.05]
    if len(top) == 1:
        return top[0][0]
    return " + ".join(f"{name} {100 * n / total:.0f}%" for name, n in top)


def memory_in_use() -> int:
    """Bytes: the process's resident memory (weights, cache and the app itself)."""
    return psutil.Process().memory_info().rss
