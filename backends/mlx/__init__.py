"""The MLX backend: Metal on Apple silicon, MLX's CPU build elsewhere."""

from .backend import MLXBackend, MLXKV
from .repack import MLXWeight, measure_error, repack_tensor

__all__ = ["MLXBackend", "MLXKV", "MLXWeight", "measure_error", "repack_tensor"]
