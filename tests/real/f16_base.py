"""The F16 base of the whole-model quantizer checks: llama.cpp's F16 file of SmolLM2 (made by
`llama_model_quantize` from the Q4_1 file, too large to commit), which diptych rebuilds
tensor for tensor (scripts/make_our_quant_fixture.py compares the two and records the
sha256 of diptych's file), and the log-probabilities the KL against it is taken from."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

import diptych
from diptych.inference.perplexity import log_softmax
from diptych.quant.gguf_write import write_gguf
from diptych.sources.hf_folder import open_source


def write_f16_base(src: Path, out: Path) -> Path:
    """`src`'s matrices dequantized and stored as F16 (vectors and norms stay F32), as
    llama.cpp's quantizer writes an F16 file from a quantized one."""
    source = open_source(src)
    return write_gguf(out, dict(source.metadata.items()), source.tensors,
                      gguf.GGMLQuantizationType.F16)


def log_probs(path: Path, tokens: list[int]) -> np.ndarray:
    """diptych's next-token log-probabilities at every position of `tokens` (torch, CPU)."""
    return log_softmax(diptych.load(path, backend="torch", n_ctx=len(tokens)).logits(tokens))
