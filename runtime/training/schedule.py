"""The learning-rate schedule: linear warmup, then a cosine from the peak to the floor."""

from __future__ import annotations

import math


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """The rate of update `step` (0-based) of `total`: (step + 1) / warmup of the peak during
    warmup, then half a cosine from `peak` down to `floor` at the last update."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = total - warmup - 1
    progress = (step - warmup) / span if span > 0 else 0.0
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
