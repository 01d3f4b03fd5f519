"""GGUF files and GGML block formats: reading, reference dequantization."""

from .tensor import QuantTensor

__all__ = ["QuantTensor"]
