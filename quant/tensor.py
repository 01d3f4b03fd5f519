"""QuantTensor: one tensor of a GGUF file, still in its on-disk block format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class QuantTensor:
    """A tensor in a GGML block format, backed by raw bytes (usually memory-mapped).

    `shape` is row-major, outermost first: a linear weight is (out_features, in_features),
    the reverse of GGUF's ggml order. `data` is uint8 of shape (n_rows, row_bytes), where
    n_rows is the product of all but the last dimension, so a row reorder (Q/K un-permute)
    is a cheap fancy index that never touches the block contents.

    `release`, for data mapped from a file: drops the file's pages this process has read
    (the page cache keeps them), so that a backend copying a large tensor chunk by chunk
    does not hold the whole of it twice.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    release: Callable[[], None] | None = None

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def take_rows(self, index: np.ndarray) -> "QuantTensor":
        """A copy holding the given rows (of a 2-D tensor) in the given order."""
        if len(self.shape) != 2:
            raise ValueError(f"take_rows needs a 2-D tensor, {self.name} is {self.shape}")
        index = np.asarray(index)
        return QuantTensor(self.name, self.ggml_type, (len(index), self.shape[1]),
                           np.ascontiguousarray(self.data[index]))

    @staticmethod
    def stacked_shape(name: str, parts: list["QuantTensor"]) -> tuple[int, int]:
        """The shape of 2-D `parts` (same type and width) stacked by rows."""
        first = parts[0]
        if any(p.ggml_type != first.ggml_type or len(p.shape) != 2 or p.shape[1] != first.shape[1]
               for p in parts):
            raise ValueError(f"{name}: stack_rows needs 2-D parts of one type and width")
        return sum(p.shape[0] for p in parts), first.shape[1]

    @staticmethod
    def stack_rows(name: str, parts: list["QuantTensor"]) -> "QuantTensor":
        """One matrix holding the rows of 2-D `parts` (same type and width) in order."""
        shape = QuantTensor.stacked_shape(name, parts)
        return QuantTensor(name, parts[0].ggml_type, shape,
                           np.concatenate([p.data for p in parts]))

    def matrix(self, i: int) -> "QuantTensor":
        """The i-th matrix of a 3-D tensor (an expert of a stacked MoE weight): a view."""
        if len(self.shape) != 3:
            raise ValueError(f"matrix() needs a 3-D tensor, {self.name} is {self.shape}")
        rows = self.shape[1]
        return QuantTensor(f"{self.name}[{i}]", self.ggml_type, self.shape[1:],
                           self.data[i * rows:(i + 1) * rows], self.release)

    def dequantize(self) -> np.ndarray:
        """The values as float32, in `shape` (numpy reference, bit-exact with gguf-py)."""
        from .dequant import dequantize_rows

        return dequantize_rows(self.data, self.ggml_type, self.shape[-1]).reshape(self.shape)
