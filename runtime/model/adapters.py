"""LoRA adapters in the weight tree: trainable low-rank pairs beside the frozen base.

A pair targets a projection by its Hugging Face (PEFT) module name and is kept in its
layer's `adapters` under the name of the matrix that holds the projection, which the graph
passes to `linear`. Where the base holds the projection inside a stacked matrix (Q, K and V
as one `wqkv`; gate and up as one `w_gate_up`), the pair goes on the stacked matrix with
`rows` set to the projection's rows there, so its output lands on those rows only.

Adapter files hold B's rows in Hugging Face order. That is the order of the base after
load (llama-family Q/K rows are un-permuted at load, so a GGUF LoRA's B, permuted like its
base, needs the same row order applied on its way in), except in MLA layers: there the
RoPE rows of q / q_b and kv_a_proj_with_mqa are put from DeepSeek's interleaved pairs into
NeoX halves at load, so B's rows move the same way on the way in and back on the way out
(`graph_rows`).
"""

from __future__ import annotations

import dataclasses

from diptych.backends.base import LoRA
from diptych.errors import InvalidArgumentError

import numpy as np

from .config import ModelConfig
from .weights import LayerWeights, deinterleave_rope_rows

# module name -> (the matrix holding it alone, the stacked matrix holding it, its place there)
TARGETS = {
    "q_proj": ("wq", "wqkv", 0), "k_proj": ("wk", "wqkv", 1), "v_proj": ("wv", "wqkv", 2),
    "o_proj": ("wo", None, 0),
    "gate_proj": ("w_gate", "w_gate_up", 0), "up_proj": ("w_up", "w_gate_up", 1),
    "down_proj": ("w_down", None, 0),
    "q_a_proj": ("wq_a", None, 0), "q_b_proj": ("wq_b", None, 0),
    "kv_a_proj_with_mqa": ("wkv_a", None, 0),
}


def has_target(layer: LayerWeights, target: str) -> bool:
    """Whether `layer` holds the projection `target` (alone or in a stacked matrix)."""
    own, stacked, _ = TARGETS[target]
    return getattr(layer, own) is not None or (stacked is not None
                                               and getattr(layer, stacked) is not None)


def target_shape(cfg: ModelConfig, index: int, target: str) -> tuple[int, int]:
    """(out, in) of projection `target` in layer `index`: B is (out, r), A (r, in)."""
    d, m = cfg.d_model, cfg.mla
    ffn = cfg.d_ff
    if cfg.moe and cfg.moe.is_moe_layer(index):  # the shared experts' FFN
        ffn = cfg.moe.d_ff * cfg.moe.n_shared
    q_out = cfg.n_heads * (m.qk_nope + m.qk_rope) if m else cfg.q_dim
    shapes = {"q_proj": (q_out, d), "k_proj": (cfg.kv_dim, d), "v_proj": (cfg.kv_dim, d),
              "o_proj": (d, cfg.n_heads * m.v_head_dim if m else cfg.q_dim),
              "gate_proj": (ffn, d), "up_proj": (ffn, d), "down_proj": (d, ffn)}
    if m:
        shapes.update(q_a_proj=(m.q_lora_rank, d), q_b_proj=(q_out, m.q_lora_rank),
                      kv_a_proj_with_mqa=(m.kv_lora_rank + m.qk_rope, d))
    return shapes[target]


def graph_rows(cfg: ModelConfig, target: str) -> np.ndarray | None:
    """The order that takes B's rows of `target` from Hugging Face order to the order of the
    loaded base (None: the same): MLA's RoPE rows, deinterleaved at load."""
    m = cfg.mla
    if m is None:
        return None
    if target in ("q_proj", "q_b_proj"):
        return deinterleave_rope_rows(cfg.n_heads, m.qk_nope + m.qk_rope, m.qk_rope)
    if target == "kv_a_proj_with_mqa":
        return deinterleave_rope_rows(1, m.kv_lora_rank + m.qk_rope, m.qk_rope)
    return None


def add_lora(cfg: ModelConfig, layer: LayerWeights, target: str, a, b, scale: float,
             dropout: float = 0.0, seed: int = 0) -> LoRA:
    """Put the pair A (r, in), B (out, r) (backend arrays) on `target` of `layer`, scaled
    by `scale` (alpha / r, or alpha / sqrt(r) for rsLoRA: the caller's choice); `dropout`
    on its input with the mask of `seed` (training only)."""
    if target not in TARGETS:
        raise InvalidArgumentError(f"no LoRA target {target!r}; targets: {', '.join(TARGETS)}")
    own, stacked, part = TARGETS[target]
    if getattr(layer, own) is not None:
        name, pair = own, LoRA(a, b, scale, None, dropout, seed)
    elif stacked is not None and getattr(layer, stacked) is not None:
        sizes = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim) if stacked == "wqkv" else (cfg.d_ff,) * 2
        if b.shape[0] != sizes[part]:
            raise InvalidArgumentError(f"{target}: B has {b.shape[0]} rows, the projection "
                                       f"{sizes[part]}")
        start = sum(sizes[:part])
        name, pair = stacked, LoRA(a, b, scale, (start, start + sizes[part]), dropout, seed)
    else:
        raise InvalidArgumentError(f"this model's layer has no {target}")
    layer.adapters.setdefault(name, []).append(pair)
    return pair


def pair_arrays(layer: LayerWeights) -> list:
    """A and B of every pair on `layer`, in the order `with_pair_arrays` reads them."""
    return [t for pairs in layer.adapters.values() for p in pairs for t in (p.a, p.b)]


def with_pair_arrays(layer: LayerWeights, arrays) -> LayerWeights:
    """A copy of `layer` whose pairs hold `arrays` (`pair_arrays` order) as A and B: a
    checkpointed layer reads its adapters from its arguments (`Backend.checkpoint`)."""
    it = iter(arrays)
    return dataclasses.replace(layer, adapters={
        name: [dataclasses.replace(p, a=next(it), b=next(it)) for p in pairs]
        for name, pairs in layer.adapters.items()})


def apply_adapter(backend, cfg: ModelConfig, layers: list[LayerWeights], pairs: dict,
                  scale: float) -> None:
    """Replace every layer's adapters with `pairs` ((layer, module) -> host A (r, in),
    B (out, r), Hugging Face row order) at `scale`, checking each against the model."""
    for layer in layers:
        layer.adapters.clear()
    try:
        for (i, module), (a, b) in sorted(pairs.items()):
            if not 0 <= i < cfg.n_layers or module not in TARGETS:
                raise InvalidArgumentError(f"the adapter has {module} in layer {i}, which "
                                           f"this model lacks")
            n_out, n_in = target_shape(cfg, i, module)
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise InvalidArgumentError(
                    f"layer {i} {module}: the adapter's pair is {b.shape[0]}x{a.shape[1]}, "
                    f"the model's projection {n_out}x{n_in}: an adapter for another model?")
            order = graph_rows(cfg, module)
            if order is not None:
                b = b[order]
            add_lora(cfg, layers[i], module, backend.prepare_dense(a), backend.prepare_dense(b),
                     scale)
    except InvalidArgumentError:
        for layer in layers:
            layer.adapters.clear()
        raise
