"""LoRA adapters in the weight tree: trainable low-rank pairs beside the frozen base.

A pair targets a projection by its Hugging Face (PEFT) module name and is kept in its
layer's `adapters` under the name of the matrix that holds the projection, which the graph
passes to `linear`. Where the base holds the projection inside a stacked matrix (Q, K and V
as one `wqkv`; gate and up as one `w_gate_up`), the pair goes on the stacked matrix with
`rows` set to the projection's rows there, so its output lands on those rows only.

B's rows are in Hugging Face order, the order of the base after load (llama-family Q/K
rows are un-permuted at load, so a GGUF LoRA's B, permuted like its base, needs the same
row order applied on its way in).
"""

from __future__ import annotations

from diptych.backends.base import LoRA
from diptych.errors import InvalidArgumentError

from .config import ModelConfig
from .weights import LayerWeights

# module name -> (the matrix holding it alone, the stacked matrix holding it, its place there)
TARGETS = {
    "q_proj": ("wq", "wqkv", 0), "k_proj": ("wk", "wqkv", 1), "v_proj": ("wv", "wqkv", 2),
    "o_proj": ("wo", None, 0),
    "gate_proj": ("w_gate", "w_gate_up", 0), "up_proj": ("w_up", "w_gate_up", 1),
    "down_proj": ("w_down", None, 0),
    "q_a_proj": ("wq_a", None, 0), "q_b_proj": ("wq_b", None, 0),
    "kv_a_proj_with_mqa": ("wkv_a", None, 0),
}


def add_lora(cfg: ModelConfig, layer: LayerWeights, target: str, a, b, scale: float) -> LoRA:
    """Put the pair A (r, in), B (out, r) (backend arrays) on `target` of `layer`, scaled
    by `scale` (alpha / r, or alpha / sqrt(r) for rsLoRA: the caller's choice)."""
    if target not in TARGETS:
        raise InvalidArgumentError(f"no LoRA target {target!r}; targets: {', '.join(TARGETS)}")
    own, stacked, part = TARGETS[target]
    if getattr(layer, own) is not None:
        name, pair = own, LoRA(a, b, scale)
    elif stacked is not None and getattr(layer, stacked) is not None:
        sizes = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim) if stacked == "wqkv" else (cfg.d_ff,) * 2
        if b.shape[0] != sizes[part]:
            raise InvalidArgumentError(f"{target}: B has {b.shape[0]} rows, the projection "
                                       f"{sizes[part]}")
        start = sum(sizes[:part])
        name, pair = stacked, LoRA(a, b, scale, (start, start + sizes[part]))
    else:
        raise InvalidArgumentError(f"this model's layer has no {target}")
    layer.adapters.setdefault(name, []).append(pair)
    return pair
