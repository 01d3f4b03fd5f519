"""Sampling settings, validated once on the host; sampler.py applies them on the device."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from diptych.errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` is greedy.

    Defaults follow llama.cpp's command line (temperature 0.8, top-k 40, top-p 0.95,
    min-p 0.05, no penalties). top_k=0, top_p=1 and min_p=0 switch a filter off.
    Penalties look at the last `penalty_last_n` tokens (prompt and generated): a token seen
    there has its logit divided by `repetition_penalty` (multiplied when <= 0), then lowered
    by `frequency_penalty` per occurrence and by `presence_penalty` once. `logit_bias` maps
    token ids to amounts added to their logits (-inf bans a token); it is kept as
    (id, bias) pairs in id order.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise SamplingError(what)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            check(_is_number(value) and math.isfinite(value),
                  f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "penalty_last_n"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{name} must be an integer >= 0, got {value!r}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                    and 0 <= self.seed < 2**63),
              f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return self.penalty_last_n > 0 and (self.repetition_penalty != 1.0
                                            or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """A logit_bias mapping (or (id, bias) pairs) as validated pairs in id order."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    if not isinstance(items, (tuple, list, type({}.items()))) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 for p in items):
        raise SamplingError(f"logit_bias must map token ids to numbers, got {bias!r}")
    pairs = {}
    for token, value in items:
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise SamplingError(f"logit_bias keys must be token ids (integers >= 0), "
                                f"got {token!r}")
        if not _is_number(value) or not (math.isfinite(value) or value == -math.inf):
            raise SamplingError(f"logit_bias values must be finite numbers or -inf, got "
                                f"{value!r} for token {token}")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))
