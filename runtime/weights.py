"""The weight tree: GGUF tensors mapped onto the graph's names and prepared by a backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import ModelFileError
from .families import family_for


@dataclass
class LayerWeights:
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    bq: Any = None
    bk: Any = None
    bv: Any = None


@dataclass
class ModelWeights:
    tok_embd: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any  # the same object as tok_embd when the output is tied

    def linears(self):
        """(name, prepared weight) for every matrix, each once."""
        yield "token_embd", self.tok_embd
        if self.output is not self.tok_embd:
            yield "output", self.output
        for i, layer in enumerate(self.layers):
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                yield f"blk.{i}.{name}", getattr(layer, name)


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation for interleaved RoPE.

    The converter stores each head's rows as (head_dim/2, 2) pairs; Hugging Face order is
    (2, head_dim/2). Reordering rows is exact for any block format (blocks run along rows).
    """
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def load_weights(tensors: dict, cfg: ModelConfig, backend,
                 progress: Callable[[int], None] | None = None) -> ModelWeights:
    """Prepare every tensor the graph needs, in file order of layers; `progress(n)` is
    called with the number of bytes just handled."""
    fam = family_for(cfg.arch)

    def get(name: str, shape: tuple[int, ...] | None = None):
        qt = tensors.get(name)
        if qt is None:
            raise ModelFileError(f"missing tensor {name}")
        if shape is not None and tuple(qt.shape) != shape:
            raise ModelFileError(f"tensor {name} has shape {qt.shape}, expected {shape}")
        if progress:
            progress(qt.nbytes)
        return qt

    def matrix(name, shape, permute_heads=0):
        qt = get(name, shape)
        if permute_heads and fam.permuted_qk:
            qt = qt.take_rows(unpermute_rows(qt.shape[0], permute_heads))
        return backend.prepare(qt)

    def vector(name, n, permute_heads=0):
        values = get(name, (n,)).dequantize()
        if permute_heads and fam.permuted_qk:
            values = values[unpermute_rows(n, permute_heads)]
        return backend.prepare_vector(values)

    d, q, kv, ff = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff
    tok = backend.prepare(get("token_embd.weight", (cfg.vocab_size, d)))
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layer = LayerWeights(
            attn_norm=vector(p + "attn_norm.weight", d),
            wq=matrix(p + "attn_q.weight", (q, d), cfg.n_heads),
            wk=matrix(p + "attn_k.weight", (kv, d), cfg.n_kv_heads),
            wv=matrix(p + "attn_v.weight", (kv, d)),
            wo=matrix(p + "attn_output.weight", (d, q)),
            ffn_norm=vector(p + "ffn_norm.weight", d),
            w_gate=matrix(p + "ffn_gate.weight", (ff, d)),
            w_up=matrix(p + "ffn_up.weight", (ff, d)),
            w_down=matrix(p + "ffn_down.weight", (d, ff)),
        )
        if cfg.qkv_bias:
            layer.bq = vector(p + "attn_q.bias", q, cfg.n_heads)
            layer.bk = vector(p + "attn_k.bias", kv, cfg.n_kv_heads)
            layer.bv = vector(p + "attn_v.bias", kv)
        layers.append(layer)
    norm = vector("output_norm.weight", d)
    out = tok if cfg.tied_output else backend.prepare(get("output.weight", (cfg.vocab_size, d)))
    return ModelWeights(tok, layers, norm, out)
