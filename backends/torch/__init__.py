"""The PyTorch backend: shared graph ops (backend.py), on the CPU (cpu/) or CUDA (cuda/)."""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
