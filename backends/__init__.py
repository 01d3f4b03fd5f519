"""Backends: where the model graph's operations run.

`select("auto")` picks MLX on Apple silicon (arm64 macOS) when MLX is installed, and torch
everywhere else. On Linux MLX's CPU wheel uses a reference BLAS (about 10x slower than
torch on the CPU), so it is chosen there only when asked for. torch runs on CUDA (Triton
kernels, torch/cuda/) when a CUDA device and Triton are present, else on the CPU (torch/cpu/);
`device` chooses one.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys

from diptych.errors import BackendUnavailableError, InvalidArgumentError

from .base import Backend

NAMES = ("auto", "torch", "mlx")
DEVICES = {"torch": "cpu | cuda | cuda:N", "mlx": "cpu | gpu"}


def available() -> list[str]:
    """Backends whose libraries are installed."""
    return [name for name in ("torch", "mlx") if importlib.util.find_spec(name)]


def _valid_device(name: str, device: str) -> bool:
    if name == "mlx":
        return device in ("cpu", "gpu")
    return re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None


def resolve(name: str = "auto", device: str | None = None) -> str:
    """The concrete backend name `select(name, device)` would build."""
    if name not in NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        name = "mlx" if apple and importlib.util.find_spec("mlx") else "torch"
    if device is not None and not (isinstance(device, str) and _valid_device(name, device)):
        raise InvalidArgumentError(
            f"unknown device {device!r} for the {name} backend; choose {DEVICES[name]}")
    if importlib.util.find_spec(name) is None:
        raise BackendUnavailableError(
            f"backend {name!r} needs its library: pip install 'diptych[{name}]'")
    return name


def select(name: str | Backend = "auto", device: str | None = None) -> Backend:
    """A backend by name ("auto", "torch", "mlx") on `device` (None: the best one present);
    a Backend instance is returned as it is."""
    if isinstance(name, Backend):
        if device is not None:
            raise InvalidArgumentError("device chooses where a named backend runs; this "
                                       f"backend instance already runs on {name.device}")
        return name
    name = resolve(name, device)
    if name == "mlx":
        from .mlx import MLXBackend

        return MLXBackend(device)
    from . import torch as _  # noqa: F401  (first: it sets the OpenMP wait policy torch reads)
    import torch

    triton = importlib.util.find_spec("triton") is not None
    if device is None:
        device = "cuda" if torch.cuda.is_available() and triton else "cpu"
    if device == "cpu":
        from .torch.cpu.backend import CpuBackend

        return CpuBackend()
    if not triton:
        raise BackendUnavailableError("the torch backend on CUDA needs Triton (the CUDA build "
                                      "of torch brings it)")
    from .torch.cuda.backend import CudaBackend

    return CudaBackend(device)
