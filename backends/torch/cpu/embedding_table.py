"""EmbeddingTable: a token embedding that is only looked up, read from the file's blocks.

When the output projection has its own matrix (not tied to the embedding), the embedding
is never multiplied: each step reads one row per token. It then stays where the file put
it (usually a memory map, as llama.cpp leaves it): no repacked copy is made at load, and
only the pages of rows read become resident. Rows are dequantized by the numpy reference
(`dequantize_rows`, bit-exact with gguf-py, as the kernels' rows are): microseconds for a
decode step's one row.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from diptych.quant import QuantTensor
from diptych.quant.dequant import dequantize_rows
from diptych.quant.formats import quant_format

from .qlinear import check_rows, taped_rows


class EmbeddingTable:
    """Rows of a (vocab, d) GGML table; `embed_rows` as QuantLinear's."""

    def __init__(self, qt: QuantTensor):
        if len(qt.shape) != 2:
            raise ValueError(f"{qt.name}: an embedding table must be 2-D, got {qt.shape}")
        quant_format(qt.ggml_type)   # a type the dequantizer lacks fails at load, not at use
        self.name = qt.name
        self.ggml_type = QT(qt.ggml_type)
        self.shape = (int(qt.shape[0]), int(qt.shape[1]))
        self._data = np.asarray(qt.data).reshape(self.shape[0], -1)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    @property
    def layout(self) -> str:
        return f"{self.ggml_type.name} -> GGML blocks as stored, rows dequantized when read"

    def __repr__(self) -> str:
        return (f"EmbeddingTable({self.name!r}, {self.ggml_type.name}, shape={self.shape}, "
                f"{self.nbytes / 2**20:.2f} MiB)")

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows W[ids] as float32 (len(ids), K)."""
        return taped_rows(ids, self.shape[1], self._deq_rows)

    def _deq_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        check_rows(self.name, ids, self.shape[0])
        out[:] = dequantize_rows(self._data[ids], self.ggml_type, self.shape[1])
