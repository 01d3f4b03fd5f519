"""The PyTorch backend: shared graph ops (backend.py), on the CPU (cpu/) or CUDA (cuda/)."""

from .cpu.threads import bounded_spin

bounded_spin()  # before torch (below) loads its OpenMP runtime

from .backend import TorchBackend  # noqa: E402

__all__ = ["TorchBackend"]
