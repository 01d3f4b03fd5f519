"""Sampling settings, validated once on the host; sampler.py applies them on the device."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from diptych.errors import ModelFileError, SamplingError

DEFAULT_MAX_TOKENS = 512  # the longest reply unless asked otherwise

# The sampling defaults a GGUF file may declare, as llama.cpp reads them -> our field names
FILE_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
    "general.sampling.penalty_last_n": "penalty_last_n",
}

# Defaults for models we know, by (general.organization, general.basename) lower-cased.
# SmolLM2-135M: llama.cpp's defaults (0.8, 0.95) ramble off topic, and even its card's
# temperature 0.2 / top-p 0.9 starts the answer to "What is the capital of France?" in
# French for 3 of 5 seeds (its first token is a near tie, "The" 0.15 vs "L" 0.14); greedy
# answers, and a light repetition penalty keeps greedy out of loops.
KNOWN_MODEL_SAMPLING = {
    ("huggingfacetb", "smollm2"): {"temperature": 0.0, "repetition_penalty": 1.1},
}


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

    def with_overrides(self, **values) -> SamplingParams:
        """These settings with `values` replacing them; a None value keeps the setting."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SamplingError(f"unknown sampling option {unknown[0]!r} "
                                f"(known: {', '.join(sorted(names))})")
        return replace(self, **{k: v for k, v in values.items() if v is not None})

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


def model_sampling(metadata) -> SamplingParams:
    """The sampling defaults of a model: llama.cpp's, then ours for a model we know, then
    the `general.sampling.*` values its file declares."""
    known = (str(metadata.get("general.organization", "")).lower(),
            str(metadata.get("general.basename", "")).lower())
    params = SamplingParams(**KNOWN_MODEL_SAMPLING.get(known, {}))
    for key, name in FILE_KEYS.items():
        if key not in metadata:
            continue
        value = metadata[key]
        kind = int if name in ("top_k", "penalty_last_n") else float
        if isinstance(value, (bool, str, list)) or not isinstance(value, (int, float)):
            raise ModelFileError(f"metadata {key} must be a number, got {value!r}")
        try:
            params = params.with_overrides(**{name: kind(value)})
        except (SamplingError, ValueError, OverflowError) as exc:
            raise ModelFileError(f"metadata {key}: {exc}") from None
    return params
