"""Model families: each maps a GGUF file's metadata and tensor names onto ModelConfig.

A family is data: a few switches and defaults, not a copy of the transformer. Keys and
defaults follow llama.cpp's reading of the same files, so that a GGUF means the same model
in both. What a file states (`<arch>.*` keys, which tensors exist) wins over a default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from diptych.model.config import MLASpec, ModelConfig, MoESpec
from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.model.rope import RopeScaling


@dataclass(frozen=True)
class Family:
    arch: str
    # llama.cpp's converter permutes Q/K rows of these archs for interleaved RoPE; we undo it
    # at load so that every family uses NeoX (half-split) RoPE on Hugging Face-ordered rows.
    permuted_qk: bool = False
    qkv_bias: bool = False
    act: str = "silu"
    post_norms: bool = False
    embed_scale_sqrt_d: bool = False
    window_pattern: int = 0          # every n-th layer is global, the rest sliding (Gemma 3: 6)
    rope_theta_local: float = 0.0    # RoPE base of the sliding-window layers
    moe_norm_topk: bool = True       # default when the file does not say
    mla: bool = False


FAMILIES: dict[str, Family] = {f.arch: f for f in (
    # llama also covers Mistral (sliding window when the file states one) and Mixtral
    # (experts when the file has them)
    Family("llama", permuted_qk=True),
    Family("qwen2", qkv_bias=True),
    Family("qwen3"),
    Family("qwen3moe"),
    Family("gemma3", act="gelu_tanh", post_norms=True, embed_scale_sqrt_d=True,
           window_pattern=6, rope_theta_local=10000.0),
    Family("deepseek2", moe_norm_topk=False, mla=True),
)}

_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


def family_for(arch: str) -> Family:
    try:
        return FAMILIES[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


class _Meta:
    """`<arch>.key` lookups with clear errors."""

    def __init__(self, metadata: Mapping, arch: str):
        self.metadata, self.arch = metadata, arch

    def need(self, key: str):
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise ModelFileError(f"GGUF metadata lacks {full}")
        return self.metadata[full]

    def get(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)


def config_from_gguf(metadata: Mapping, tensor_shapes: Mapping[str, tuple]) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (`<arch>.*` keys) and the tensor table."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError("GGUF metadata has no general.architecture")
    fam = family_for(arch)
    m = _Meta(metadata, arch)

    n_heads = int(m.need("attention.head_count"))
    d_model = int(m.need("embedding_length"))
    n_layers = int(m.need("block_count"))
    head_dim = int(m.get("attention.key_length", d_model // n_heads))
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None:
        raise ModelFileError("GGUF file has no token_embd.weight tensor")
    cfg = ModelConfig(
        arch=arch,
        name=str(metadata.get("general.name", arch)),
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(m.get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(m.need("feed_forward_length")),
        vocab_size=int(m.get("vocab_size", embd[0])),
        context_length=int(m.need("context_length")),
        rms_eps=float(m.need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(m.get("rope.freq_base", 10000.0)),
        rope_dim=int(m.get("rope.dimension_count", head_dim)),
        qkv_bias=fam.qkv_bias and "blk.0.attn_q.bias" in tensor_shapes,
        tied_output="output.weight" not in tensor_shapes,
        act=fam.act,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        post_norms=fam.post_norms,
        embed_scale=math.sqrt(d_model) if fam.embed_scale_sqrt_d else 1.0,
        attn_scale=float(m.get("attention.scale", 0.0)),
        final_softcap=float(m.get("final_logit_softcapping", 0.0)),
    )
    cfg = _with_window(cfg, fam, m)
    if "blk.0.ffn_gate_inp.weight" in tensor_shapes or m.get("expert_count"):
        cfg = replace(cfg, moe=_moe_spec(fam, m, tensor_shapes, n_layers))
    if fam.mla:
        cfg = _with_mla(cfg, m)
    cfg = replace(cfg, rope_scaling=_rope_scaling(m))
    if cfg.n_heads % cfg.n_kv_heads or cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFileError(f"inconsistent attention shape in metadata: {cfg}")
    return cfg


def _with_window(cfg: ModelConfig, fam: Family, m: _Meta) -> ModelConfig:
    window = int(m.get("attention.sliding_window", 0) or 0)
    if window <= 0:
        return cfg
    pattern = m.get("attention.sliding_window_pattern", fam.window_pattern)
    if not isinstance(pattern, (int, np.integer)):  # one flag per layer
        if len(pattern) != cfg.n_layers:
            raise ModelFileError(f"sliding_window_pattern has {len(pattern)} entries for "
                                 f"{cfg.n_layers} layers")
        layers = tuple(bool(p) for p in pattern)
    else:  # every n-th layer global (n = 0: all layers sliding), as llama.cpp reads it
        n = int(pattern)
        layers = tuple(n == 0 or i % n < n - 1 for i in range(cfg.n_layers))
    theta_local = float(m.get("rope.freq_base_swa", fam.rope_theta_local or 0.0))
    return replace(cfg, sliding_window=window, window_layers=layers,
                   rope_theta_local=theta_local)


def _moe_spec(fam: Family, m: _Meta, shapes: Mapping, n_layers: int) -> MoESpec:
    n_experts = int(m.need("expert_count"))
    first_dense = int(m.get("leading_dense_block_count", 0))
    router = shapes.get(f"blk.{first_dense}.ffn_gate_inp.weight")
    gate = shapes.get(f"blk.{first_dense}.ffn_gate_exps.weight")
    if router is None or gate is None:
        raise ModelFileError(f"expert_count is {n_experts} but layer {first_dense} has no "
                             "router or expert tensors")
    d_ff = int(m.get("expert_feed_forward_length", gate[1]))
    gating = _GATING.get(int(m.get("expert_gating_func", 1)))
    if gating is None:
        raise UnsupportedModelError(f"expert gating function {m.get('expert_gating_func')} "
                                    "is not supported")
    shexp = shapes.get(f"blk.{first_dense}.ffn_gate_shexp.weight")
    return MoESpec(
        n_experts=n_experts,
        n_used=int(m.need("expert_used_count")),
        d_ff=d_ff,
        gating=gating,
        norm_topk=bool(m.get("expert_weights_norm", fam.moe_norm_topk)),
        scale=float(m.get("expert_weights_scale", 1.0) or 1.0),
        n_groups=int(m.get("expert_group_count", 1) or 1),
        n_groups_used=int(m.get("expert_group_used_count", 1) or 1),
        score_bias=f"blk.{first_dense}.exp_probs_b.bias" in shapes,
        n_shared=(shexp[0] // d_ff) if shexp is not None else 0,
        first_dense=first_dense,
    )


def _with_mla(cfg: ModelConfig, m: _Meta) -> ModelConfig:
    rope = int(m.need("rope.dimension_count"))
    qk = int(m.need("attention.key_length_mla"))
    mla = MLASpec(q_lora_rank=int(m.get("attention.q_lora_rank", 0) or 0),
                  kv_lora_rank=int(m.need("attention.kv_lora_rank")),
                  qk_nope=qk - rope, qk_rope=rope,
                  v_head_dim=int(m.need("attention.value_length_mla")))
    # In the cache, MLA is one shared KV "head" of latent + RoPE part (what llama.cpp
    # writes as head_count_kv = 1, key_length = kv_lora + rope).
    return replace(cfg, mla=mla, n_kv_heads=1, head_dim=qk, rope_dim=rope)


def _rope_scaling(m: _Meta) -> RopeScaling | None:
    kind = m.get("rope.scaling.type", "none") or "none"
    factor = float(m.get("rope.scaling.factor", 1.0) or 1.0)
    if kind == "none" or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported")
    return RopeScaling(
        kind, factor,
        original_context=int(m.get("rope.scaling.original_context_length", 0) or 0),
        beta_fast=float(m.get("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(m.get("rope.scaling.yarn_beta_slow", 1.0)),
        ext_factor=float(m.get("rope.scaling.yarn_ext_factor", 1.0)),
        attn_factor=float(m.get("rope.scaling.yarn_attn_factor", 0.0) or 0.0),
        log_multiplier=float(m.get("rope.scaling.yarn_log_multiplier", 0.0) or 0.0))
