"""Each layer's RoPE: base frequencies, and the scaling a model was trained with.

Kinds (as GGUF states them): linear position interpolation, Llama 3's per-frequency
divisors (the `rope_freqs.weight` tensor), and YaRN, which blends interpolated and
original frequencies across a ramp of dimensions and scales cos/sin by an attention factor
(DeepSeek puts that factor into the softmax scale instead). The formulas follow the
published YaRN method as Hugging Face transformers and llama.cpp implement it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diptych.backends.base import RopeSpec


@dataclass(frozen=True)
class RopeScaling:
    kind: str                   # "linear" | "yarn"
    factor: float
    original_context: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0
    attn_factor: float = 0.0    # 0: YaRN's default, 0.1 ln(factor) + 1
    log_multiplier: float = 0.0  # DeepSeek: softmax scale *= (1 + this * ln(factor))^2

    def softmax_factor(self) -> float:
        if self.kind != "yarn" or not self.log_multiplier:
            return 1.0
        return (1.0 + self.log_multiplier * math.log(self.factor)) ** 2


def layer_rope(dim: int, theta: float, scaling: RopeScaling | None,
               freq_factors: np.ndarray | None = None) -> RopeSpec:
    if scaling is None and freq_factors is None:
        return RopeSpec(dim, theta)
    inv = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    mscale = 1.0
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    if scaling is not None and scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling is not None and scaling.kind == "yarn":
        inv, mscale = _yarn(inv, dim, theta, scaling)
    return RopeSpec(dim, theta, tuple(float(f) for f in inv), mscale)


def _yarn(inv: np.ndarray, dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return dim * math.log(s.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 0.001), 0.0, 1.0)
    keep = (1.0 - ramp) * s.ext_factor  # 1: original frequency (fast dims), 0: interpolated
    blended = inv / s.factor * (1.0 - keep) + inv * keep
    if s.log_multiplier:  # DeepSeek: the factor goes into the softmax scale
        return blended, 1.0
    return blended, s.attn_factor or 0.1 * math.log(s.factor) + 1.0
