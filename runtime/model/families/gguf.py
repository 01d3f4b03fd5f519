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

from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.model.config import MLASpec, ModelConfig, MoESpec
from diptych.model.metadata import ArchMetadata
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


def config_from_gguf(metadata: Mapping, tensor_shapes: Mapping[str, tuple]) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (`<arch>.*` keys) and the tensor table.

    Every hyper-parameter is checked for its type and range and against the tensors that
    exist (layer count, widths, head counts, vocabulary), so nothing planned or allocated
    afterwards rests on a number the file does not back up."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError("GGUF metadata has no general.architecture string")
    fam = family_for(arch)
    m = ArchMetadata(metadata, arch)
    name = metadata.get("general.name", arch)
    if not isinstance(name, str):
        raise ModelFileError("general.name must be a string")
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None or len(embd) != 2:
        raise ModelFileError("GGUF file has no token_embd.weight matrix")

    n_layers = m.count("block_count")
    if n_layers > (present := _layer_count(tensor_shapes)):
        raise ModelFileError(f"{m.key('block_count')} is {n_layers} but the file has tensors "
                             f"for {present} layers")
    d_model = _matches(m, "embedding_length", m.count("embedding_length"), embd[1],
                       "the columns of token_embd.weight")
    n_heads = m.count("attention.head_count")
    n_kv_heads = m.count("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        raise ModelFileError(f"{m.key('attention.head_count')} ({n_heads}) is not a multiple "
                             f"of {m.key('attention.head_count_kv')} ({n_kv_heads})")
    if not m.has("attention.key_length") and d_model % n_heads:
        raise ModelFileError(f"{m.key('embedding_length')} ({d_model}) is not a multiple of "
                             f"{m.key('attention.head_count')} ({n_heads})")
    head_dim = m.count("attention.key_length", d_model // n_heads)
    rope_dim = m.count("rope.dimension_count", head_dim, minimum=2)
    if rope_dim % 2 or rope_dim > head_dim:
        raise ModelFileError(f"{m.key('rope.dimension_count')} ({rope_dim}) must be even and "
                             f"at most the head size {m.key('attention.key_length')} "
                             f"({head_dim})")
    moe = "blk.0.ffn_gate_inp.weight" in tensor_shapes or \
        m.count("expert_count", 0, minimum=0) > 0
    cfg = ModelConfig(
        arch=arch,
        name=name,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=m.count("feed_forward_length", minimum=0 if moe else 1),
        vocab_size=_matches(m, "vocab_size", m.count("vocab_size", embd[0]), embd[0],
                            "the rows of token_embd.weight"),
        context_length=m.count("context_length"),
        rms_eps=m.number("attention.layer_norm_rms_epsilon", above=0.0, maximum=1.0),
        rope_theta=m.number("rope.freq_base", 10000.0, above=1.0),
        rope_dim=rope_dim,
        qkv_bias=fam.qkv_bias and "blk.0.attn_q.bias" in tensor_shapes,
        tied_output="output.weight" not in tensor_shapes,
        act=fam.act,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        post_norms=fam.post_norms,
        embed_scale=math.sqrt(d_model) if fam.embed_scale_sqrt_d else 1.0,
        attn_scale=m.number("attention.scale", 0.0, minimum=0.0),
        final_softcap=m.number("final_logit_softcapping", 0.0, minimum=0.0),
    )
    _check_vocabulary(metadata, embd[0])
    cfg = _with_window(cfg, fam, m)
    if moe:
        cfg = replace(cfg, moe=_moe_spec(fam, m, tensor_shapes, cfg))
    if fam.mla:
        cfg = _with_mla(cfg, m, tensor_shapes)
    else:
        _check_attention_shapes(cfg, m, tensor_shapes)
    if not moe or cfg.moe.first_dense:
        _check_ffn_shapes(cfg, m, tensor_shapes)
    return replace(cfg, rope_scaling=_rope_scaling(m, cfg.context_length))


def _layer_count(shapes: Mapping) -> int:
    """How many layers, from blk.0 on, have tensors."""
    present = {int(n.split(".")[1]) for n in shapes
               if n.startswith("blk.") and n.split(".")[1].isdigit()}
    n = 0
    while n in present:
        n += 1
    return n


def _matches(m: ArchMetadata, key: str, value: int, actual: int, what: str) -> int:
    if value != actual:
        raise ModelFileError(f"{m.key(key)} is {value} but {what} say {actual}")
    return value


def _check_vocabulary(metadata: Mapping, rows: int) -> None:
    """A token the embedding table has no row for would fail in the middle of a reply."""
    key = "tokenizer.ggml.tokens"
    tokens = metadata.get(key)
    if tokens is None:
        return
    if not isinstance(tokens, (list, np.ndarray)):
        raise ModelFileError(f"{key} must be an array of token strings")
    if len(tokens) > rows:
        raise ModelFileError(f"{key} has {len(tokens)} tokens but token_embd.weight only "
                             f"{rows} rows")


def _check_shape(shapes: Mapping, name: str, want: tuple, keys: str) -> None:
    have = shapes.get(name)
    if have is not None and tuple(have) != want:
        raise ModelFileError(f"{name} has shape {tuple(have)}, but {keys} make it {want}")


def _check_attention_shapes(cfg: ModelConfig, m: ArchMetadata, shapes: Mapping) -> None:
    heads = f"{m.key('attention.head_count')} and {m.key('attention.key_length')}"
    kv_heads = f"{m.key('attention.head_count_kv')} and {m.key('attention.key_length')}"
    _check_shape(shapes, "blk.0.attn_q.weight", (cfg.q_dim, cfg.d_model), heads)
    _check_shape(shapes, "blk.0.attn_k.weight", (cfg.kv_dim, cfg.d_model), kv_heads)
    _check_shape(shapes, "blk.0.attn_v.weight", (cfg.kv_dim, cfg.d_model), kv_heads)


def _check_ffn_shapes(cfg: ModelConfig, m: ArchMetadata, shapes: Mapping) -> None:
    _check_shape(shapes, "blk.0.ffn_up.weight", (cfg.d_ff, cfg.d_model),
                 f"{m.key('feed_forward_length')} and {m.key('embedding_length')}")


def _with_window(cfg: ModelConfig, fam: Family, m: ArchMetadata) -> ModelConfig:
    window = m.count("attention.sliding_window", 0, minimum=0)
    if window == 0:
        return cfg
    key = "attention.sliding_window_pattern"
    pattern = m.raw(key, fam.window_pattern)
    if isinstance(pattern, (list, tuple, np.ndarray)):  # one flag per layer
        if len(pattern) != cfg.n_layers or not all(p in (0, 1) for p in pattern):
            raise ModelFileError(f"{m.key(key)} must hold one flag for each of the "
                                 f"{cfg.n_layers} layers")
        layers = tuple(bool(p) for p in pattern)
    else:  # every n-th layer global (n = 0: all layers sliding), as llama.cpp reads it
        n = m.count(key, fam.window_pattern, minimum=0)
        layers = tuple(n == 0 or i % n < n - 1 for i in range(cfg.n_layers))
    theta_local = (m.number("rope.freq_base_swa", above=1.0) if m.has("rope.freq_base_swa")
                   else fam.rope_theta_local)
    return replace(cfg, sliding_window=window, window_layers=layers,
                   rope_theta_local=theta_local)


def _moe_spec(fam: Family, m: ArchMetadata, shapes: Mapping, cfg: ModelConfig) -> MoESpec:
    n_experts = m.count("expert_count")
    first_dense = m.count("leading_dense_block_count", 0, minimum=0, maximum=cfg.n_layers - 1)
    router = shapes.get(f"blk.{first_dense}.ffn_gate_inp.weight")
    gate = shapes.get(f"blk.{first_dense}.ffn_gate_exps.weight")
    if router is None or gate is None or len(gate) != 3:
        raise ModelFileError(f"{m.key('expert_count')} is {n_experts} but layer {first_dense} "
                             f"(the first after {m.key('leading_dense_block_count')}) has no "
                             "router or expert tensors")
    _matches(m, "expert_count", n_experts, router[0], "the router's rows")
    d_ff = m.count("expert_feed_forward_length", gate[1])
    _check_shape(shapes, f"blk.{first_dense}.ffn_gate_exps.weight", (n_experts, d_ff, cfg.d_model),
                 f"{m.key('expert_count')} and {m.key('expert_feed_forward_length')}")
    gating = _GATING.get(m.count("expert_gating_func", 1, minimum=0))
    if gating is None:
        raise UnsupportedModelError(f"{m.key('expert_gating_func')}: expert gating function "
                                    f"{m.raw('expert_gating_func')} is not supported")
    n_groups = m.count("expert_group_count", 1, minimum=0) or 1
    if n_experts % n_groups:
        raise ModelFileError(f"{m.key('expert_group_count')} ({n_groups}) does not divide "
                             f"{m.key('expert_count')} ({n_experts})")
    shexp = shapes.get(f"blk.{first_dense}.ffn_gate_shexp.weight")
    if shexp is not None and shexp[0] % d_ff:
        raise ModelFileError(f"the shared experts' width {shexp[0]} is not a multiple of "
                             f"{m.key('expert_feed_forward_length')} ({d_ff})")
    return MoESpec(
        n_experts=n_experts,
        n_used=m.count("expert_used_count", maximum=n_experts),
        d_ff=d_ff,
        gating=gating,
        norm_topk=m.flag("expert_weights_norm", fam.moe_norm_topk),
        scale=m.number("expert_weights_scale", 1.0, minimum=0.0) or 1.0,
        n_groups=n_groups,
        n_groups_used=m.count("expert_group_used_count", 1, minimum=0, maximum=n_groups) or 1,
        score_bias=f"blk.{first_dense}.exp_probs_b.bias" in shapes,
        n_shared=(shexp[0] // d_ff) if shexp is not None else 0,
        first_dense=first_dense,
    )


def _with_mla(cfg: ModelConfig, m: ArchMetadata, shapes: Mapping) -> ModelConfig:
    rope = m.count("rope.dimension_count", minimum=2)
    if rope % 2:
        raise ModelFileError(f"{m.key('rope.dimension_count')} ({rope}) must be even")
    qk = m.count("attention.key_length_mla", minimum=rope + 1)
    mla = MLASpec(q_lora_rank=m.count("attention.q_lora_rank", 0, minimum=0),
                  kv_lora_rank=m.count("attention.kv_lora_rank"),
                  qk_nope=qk - rope, qk_rope=rope,
                  v_head_dim=m.count("attention.value_length_mla"))
    _check_shape(shapes, "blk.0.attn_kv_a_mqa.weight", (mla.kv_lora_rank + rope, cfg.d_model),
                 f"{m.key('attention.kv_lora_rank')} and {m.key('rope.dimension_count')}")
    v_keys = f"{m.key('attention.value_length_mla')} and {m.key('attention.kv_lora_rank')}"
    _check_shape(shapes, "blk.0.attn_v_b.weight",
                 (cfg.n_heads, mla.v_head_dim, mla.kv_lora_rank), v_keys)
    _check_shape(shapes, "blk.0.attn_kv_b.weight",
                 (cfg.n_heads * (mla.qk_nope + mla.v_head_dim), mla.kv_lora_rank), v_keys)
    q_a = "blk.0.attn_q_a.weight"
    if bool(mla.q_lora_rank) != (q_a in shapes):
        raise ModelFileError(f"{m.key('attention.q_lora_rank')} is {mla.q_lora_rank} but the "
                             f"file {'lacks' if mla.q_lora_rank else 'has'} {q_a}")
    _check_shape(shapes, q_a, (mla.q_lora_rank, cfg.d_model), m.key("attention.q_lora_rank"))
    # In the cache, MLA is one shared KV "head" of latent + RoPE part (what llama.cpp
    # writes as head_count_kv = 1, key_length = kv_lora + rope).
    return replace(cfg, mla=mla, n_kv_heads=1, head_dim=qk, rope_dim=rope)


def _rope_scaling(m: ArchMetadata, context_length: int) -> RopeScaling | None:
    kind = m.text("rope.scaling.type", "none") or "none"
    factor = m.number("rope.scaling.factor", 1.0, minimum=0.0) or 1.0
    if kind == "none" or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported")
    return RopeScaling(
        kind, factor,
        # llama.cpp's default when a YaRN file does not say: the trained context
        original_context=m.count("rope.scaling.original_context_length", 0, minimum=0)
        or context_length,
        beta_fast=m.number("rope.scaling.yarn_beta_fast", 32.0, above=0.0),
        beta_slow=m.number("rope.scaling.yarn_beta_slow", 1.0, above=0.0),
        ext_factor=m.number("rope.scaling.yarn_ext_factor", 1.0, minimum=0.0),
        attn_factor=m.number("rope.scaling.yarn_attn_factor", 0.0, minimum=0.0),
        log_multiplier=m.number("rope.scaling.yarn_log_multiplier", 0.0, minimum=0.0,
                                maximum=1.0))
