"""Inputs on which our quantizers are compared with llama.cpp's (scripts/make_quantize_fixtures.py
writes llama.cpp's errors on them to tests/fixtures/quantize_llama_cpp.json).

None is already coarse for the types compared: real weights stored as Q8_0 (256 levels per
32 values) or Q6_K, and heavy-tailed synthetic ones. Real tensors are read a few rows at a
time and their values laid out in rows of 1024, so K-quant blocks fit whatever the model's
width; the values are what matters to a quantizer, not which matrix row they came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROW = 1024
#: the types compared with llama.cpp's quantizer
COMPARED_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


@dataclass(frozen=True)
class RealCase:
    model: str        # "smollm2" | "qwen2" | "gemma3"
    tensor: str
    rows: int         # how many of the tensor's first rows
    coarse_for: tuple[str, ...] = ()  # its own type: requantizing to it is near-lossless

    @property
    def name(self) -> str:
        return f"{self.model}:{self.tensor}[:{self.rows}]"

    def values(self, paths: dict[str, Path]) -> np.ndarray:
        from diptych.quant.gguf_file import GGUFFile

        with GGUFFile(paths[self.model]) as f:
            t = f.tensors[self.tensor]
            x = t.take_rows(np.arange(self.rows)).dequantize()
        return x.reshape(-1, ROW)


@dataclass(frozen=True)
class SyntheticCase:
    name: str
    seed: int
    coarse_for = ()

    def values(self, paths=None) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        shape = (64, ROW)
        if self.name == "student-t3":
            x = rng.standard_t(3, shape) * 0.02
        elif self.name == "laplace-outliers":
            x = rng.laplace(0, 0.01, shape)
            hits = rng.random(shape) < 0.002
            x[hits] *= 40
        elif self.name == "shifted-lognormal":  # one-signed sub-blocks: exercises the mins
            x = rng.lognormal(-4, 1, shape) * np.where(rng.random((64, 1)) < 0.5, 1, -1)
        else:
            raise ValueError(self.name)
        return x.astype(np.float32)


CASES = (
    RealCase("smollm2", "token_embd.weight", 128),
    RealCase("qwen2", "output.weight", 128),
    RealCase("gemma3", "token_embd.weight", 128),
    RealCase("qwen2", "blk.0.ffn_down.weight", 24, coarse_for=("Q6_K",)),
    RealCase("gemma3", "blk.0.ffn_down.weight", 32, coarse_for=("Q6_K",)),
    SyntheticCase("student-t3", 1),
    SyntheticCase("laplace-outliers", 2),
    SyntheticCase("shifted-lognormal", 3),
)


def digest(x: np.ndarray) -> str:
    """sha256 of the float32 input: shows the fixture and the test saw the same values."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """sum((x - y)^2) / sum(x^2), in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(((x - y) ** 2).sum() / (x * x).sum())


#: the types whose quantizer takes an importance matrix, compared with llama.cpp's
IMATRIX_COMPARED_TYPES = COMPARED_TYPES + ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


def importance(seed: int = 11) -> np.ndarray:
    """A heavy-tailed column importance (what an imatrix holds: mean squared activations)
    for rows of ROW values."""
    return np.random.default_rng(seed).lognormal(0, 1.5, ROW).astype(np.float32)


def weighted_error(x: np.ndarray, y: np.ndarray, qw: np.ndarray) -> float:
    """sum(qw * (x - y)^2) / sum(qw * x^2) over columns weighted by qw, in float64."""
    x, y, qw = x.astype(np.float64), y.astype(np.float64), qw.astype(np.float64)
    return float((qw * (x - y) ** 2).sum() / (qw * x * x).sum())
