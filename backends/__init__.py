"""Backends: where the model graph's operations run.

`select("auto")` picks MLX on Apple silicon (arm64 macOS) when MLX is installed, and torch
everywhere else. On Linux MLX's CPU wheel uses a reference BLAS (about 10x slower than
torch on the CPU), so it is chosen there only when asked for. torch runs on CUDA (Triton
kernels, torch/cuda/) when a CUDA device and Triton are present, else on the CPU.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

from diptych.errors import BackendUnavailableError

from .base import Backend

NAMES = ("auto", "torch", "mlx")


def available() -> list[str]:
    """Backends whose libraries are installed."""
    return [name for name in ("torch", "mlx") if importlib.util.find_spec(name)]


def resolve(name: str = "auto") -> str:
    """The concrete backend name `select(name)` would build."""
    if name not in NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        name = "mlx" if apple and importlib.util.find_spec("mlx") else "torch"
    if importlib.util.find_spec(name) is None:
        raise BackendUnavailableError(
            f"backend {name!r} needs its library: pip install 'diptych[{name}]'")
    return name


def select(name: str = "auto") -> Backend:
    name = resolve(name)
    if name == "mlx":
        from .mlx import MLXBackend

        return MLXBackend()
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("triton"):
        from .torch.cuda.backend import CudaBackend

        return CudaBackend()
    from .torch import TorchBackend

    return TorchBackend("cpu")
