"""The PyTorch backend: shared graph ops (backend.py), on the CPU (cpu/) or CUDA (cuda/)."""

from .cpu.threads import quiet_idle_workers

quiet_idle_workers()  # before torch (below) loads its OpenMP runtime

from .backend import TorchBackend  # noqa: E402

__all__ = ["TorchBackend"]
