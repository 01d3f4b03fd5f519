"""Backends: where the model graph's operations run.

Today there is one: torch on the CPU. The design's rule for `select("auto")` — MLX on Apple
silicon, torch (CUDA) where CUDA is present, torch on the CPU otherwise — applies as those
backends land.
"""

from __future__ import annotations

import importlib.util

from diptych.errors import BackendUnavailableError

from .base import Backend

NAMES = ("auto", "torch", "mlx")


def available() -> list[str]:
    """Backends whose libraries are installed and implemented here."""
    return [name for name, mod in (("torch", "torch"),) if importlib.util.find_spec(mod)]


def resolve(name: str = "auto") -> str:
    """The concrete backend name `select(name)` would build."""
    if name not in NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "mlx":
        raise BackendUnavailableError(
            "the MLX backend is not available in this version of diptych; use backend='torch'")
    if name == "auto":
        # Until the MLX and CUDA backends land, every machine runs torch on the CPU.
        name = "torch"
    if importlib.util.find_spec(name) is None:
        raise BackendUnavailableError(
            f"backend {name!r} needs its library: pip install 'diptych[{name}]'")
    return name


def select(name: str = "auto") -> Backend:
    name = resolve(name)
    from .torch import TorchBackend

    return TorchBackend("cpu")
