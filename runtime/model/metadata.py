"""Typed reads of a model's `<arch>.*` metadata, each checked for its type and range.

A model file is untrusted input: a string where a count belongs, a zero head count, a NaN
epsilon or a negative RoPE base must stop the load with a `ModelFileError` naming the key,
before anything is planned or allocated, never surface later as a ZeroDivisionError or as
NaN logits. Families read every hyper-parameter through `ArchMetadata`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from diptych.errors import ModelFileError, UnsupportedModelError

MAX_COUNT = 2**31 - 1  # counts and sizes larger than this are not a model's

_REQUIRED = object()

# keys llama.cpp also reads as one value per layer (OpenELM and others): valid, unsupported
_PER_LAYER = frozenset(["attention.head_count", "attention.head_count_kv", "feed_forward_length"])


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return is_integer(value) or isinstance(value, (float, np.floating))


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return "an array"
    return f"a {type(value).__name__}"


class ArchMetadata:
    """`<arch>.key` lookups that return checked Python values."""

    def __init__(self, metadata: Mapping, arch: str):
        self.metadata, self.arch = metadata, arch

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.metadata

    def raw(self, name: str, default: Any = _REQUIRED) -> Any:
        key = self.key(name)
        if key in self.metadata:
            return self.metadata[key]
        if default is _REQUIRED:
            raise ModelFileError(f"GGUF metadata lacks {key}")
        return default

    def count(self, name: str, default: Any = _REQUIRED, minimum: int = 1,
              maximum: int = MAX_COUNT) -> int:
        """An integer in [minimum, maximum]."""
        value = self.raw(name, default)
        if name in _PER_LAYER and isinstance(value, (list, tuple, np.ndarray)):
            raise UnsupportedModelError(f"{self.key(name)} is given per layer; diptych runs "
                                        "models with one value for all layers")
        if not is_integer(value):
            raise ModelFileError(f"{self.key(name)} must be an integer, not {_kind(value)} "
                                 f"({value!r:.40})")
        value = int(value)
        if not minimum <= value <= maximum:
            raise ModelFileError(f"{self.key(name)} is {value}; it must be in "
                                 f"[{minimum}, {maximum}]")
        return value

    def number(self, name: str, default: Any = _REQUIRED, minimum: float = -math.inf,
               maximum: float = math.inf, above: float | None = None) -> float:
        """A finite number in [minimum, maximum], and greater than `above` if given."""
        value = self.raw(name, default)
        if not is_number(value):
            raise ModelFileError(f"{self.key(name)} must be a number, not {_kind(value)} "
                                 f"({value!r:.40})")
        value = float(value)
        if not (math.isfinite(value) and minimum <= value <= maximum
                and (above is None or value > above)):
            bound = (f"> {above:g}" if above is not None else "") + (
                f" in [{minimum:g}, {maximum:g}]" if (minimum, maximum) != (-math.inf, math.inf)
                else "")
            raise ModelFileError(f"{self.key(name)} is {value}; it must be a finite number"
                                 f"{' ' if bound[:1] == '>' else ''}{bound}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not (isinstance(value, (bool, np.bool_)) or (is_integer(value) and value in (0, 1))):
            raise ModelFileError(f"{self.key(name)} must be a boolean, not {_kind(value)} "
                                 f"({value!r:.40})")
        return bool(value)

    def text(self, name: str, default: Any = _REQUIRED) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise ModelFileError(f"{self.key(name)} must be a string, not {_kind(value)}")
        return value
