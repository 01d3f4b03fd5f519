"""Hugging Face config.json -> GGUF metadata, per family, as llama.cpp's converter writes it.

One `HFFamily` per config.json `model_type`: the GGUF architecture, the weight transforms
llama.cpp applies to that family (see sources/hf_folder.py), and the metadata keys beyond the
common ones, each a function of the config (None: the key is not written). Tensor names
come from gguf-py's TensorNameMap, the table llama.cpp's converter uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import ExpertGatingFuncType, RopeScalingType

from diptych.errors import UnsupportedModelError

Config = dict[str, Any]
Meta = tuple[tuple[str, Callable[[Config], Any]], ...]


@dataclass(frozen=True)
class HFFamily:
    arch: str                      # GGUF general.architecture
    permute_qk: bool = False       # Q/K rows in llama.cpp's order for interleaved RoPE
    norm_shift: float = 0.0        # added to every *norm.weight (Gemma computes (1 + w))
    split_kv_b: bool = False       # MLA: kv_b_proj -> attn_k_b (transposed) and attn_v_b
    sentencepiece_first: bool = True  # a tokenizer.model wins over tokenizer.json
    meta: Meta = ()                # `<arch>.` keys after the common ones (same key: replaced)


def get(*names: str, default: Any = None) -> Callable[[Config], Any]:
    """The first of `names` that config.json sets (not null), else `default`."""
    return lambda c: next((c[n] for n in names if c.get(n) is not None), default)


def rope(c: Config, layer_kind: str = "full_attention") -> dict:
    """RoPE parameters of one layer kind, from `rope_parameters` (transformers >= 5) or the
    older `rope_theta` / `rope_scaling` / `rope_local_base_freq` fields."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get(layer_kind) or {}
    if layer_kind == "sliding_attention":
        local = get("rope_local_base_freq", "local_rope_theta")(c)
        return {"rope_theta": local} if local is not None else {}
    theta = get("rope_theta")(c)
    return {**params, **({"rope_theta": theta} if theta is not None else {})}


def head_dim(c: Config) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _gating(c: Config) -> int | None:
    func = get("scoring_func", "score_function")(c)
    if func is None:
        return None
    try:
        return {"softmax": ExpertGatingFuncType.SOFTMAX,
                "sigmoid": ExpertGatingFuncType.SIGMOID}[func].value
    except KeyError:
        raise UnsupportedModelError(f"expert scoring function {func!r} is not supported") from None


def _rope_scaling(c: Config) -> dict[str, Any]:
    p = rope(c)
    kind, factor = p.get("rope_type", p.get("type")), p.get("factor")
    if kind in (None, "default", "llama3") or factor is None:
        return {}  # llama3's scaling is a tensor, rope_freqs (llama3_rope_factors)
    if kind == "linear":
        return {"rope.scaling.type": RopeScalingType.LINEAR.value, "rope.scaling.factor": factor}
    if kind == "yarn":
        out = {"rope.scaling.type": RopeScalingType.YARN.value, "rope.scaling.factor": factor,
               "rope.scaling.original_context_length": p["original_max_position_embeddings"]}
        for key, name in (("yarn_ext_factor", "extrapolation_factor"),
                          ("yarn_attn_factor", "attention_factor"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if p.get(name) is not None:
                out[f"rope.scaling.{key}"] = p[name]
        return out
    raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported by the converter")


def llama3_rope_factors(c: Config) -> np.ndarray | None:
    """Llama 3.1's per-frequency RoPE divisors, which GGUF stores as `rope_freqs.weight`:
    1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    p = rope(c)
    if str(p.get("rope_type", "")).lower() != "llama3":
        return None
    dim = head_dim(c)
    freqs = 1.0 / p.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factor = p.get("factor", 8.0)
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blend))
    return out.astype(np.float32)


def common_meta(c: Config) -> dict[str, Any]:
    """The `<arch>.` keys llama.cpp's converter writes for every text model."""
    fields = {
        "block_count": get("num_hidden_layers"),
        "context_length": get("max_position_embeddings"),
        "embedding_length": get("hidden_size"),
        "feed_forward_length": get("intermediate_size"),
        "attention.head_count": get("num_attention_heads"),
        "attention.head_count_kv": get("num_key_value_heads"),
        "rope.freq_base": lambda c: rope(c).get("rope_theta"),
        "rope.freq_base_swa": lambda c: rope(c, "sliding_attention").get("rope_theta"),
        "attention.layer_norm_rms_epsilon": get("rms_norm_eps"),
        "expert_count": get("num_local_experts", "num_experts", "n_routed_experts"),
        "expert_used_count": get("num_experts_per_tok"),
        "expert_group_count": get("n_group"),
        "expert_group_used_count": get("topk_group"),
        "expert_gating_func": _gating,
        "attention.key_length": get("head_dim"),
        "attention.value_length": get("head_dim"),
    }
    out = {k: f(c) for k, f in fields.items()}
    out.update(_rope_scaling(c))
    return out


_LLAMA = HFFamily("llama", permute_qk=True, meta=(
    ("vocab_size", get("vocab_size")),
    ("rope.dimension_count", head_dim),
))
_MISTRAL = HFFamily("llama", permute_qk=True, meta=_LLAMA.meta + (
    # not written by llama.cpp's converter (its `llama` arch has no window); diptych reads it
    ("attention.sliding_window", get("sliding_window")),
))


def _swa_pattern(c: Config):
    """Which layers slide. llama.cpp reads this array (else assumes 5 sliding : 1 full)."""
    kinds = c.get("layer_types")
    return None if kinds is None else np.array([k == "sliding_attention" for k in kinds])


_GEMMA3 = HFFamily("gemma3", norm_shift=1.0, meta=(
    ("context_length", get("max_position_embeddings", default=131072)),
    ("attention.head_count", get("num_attention_heads", default=8)),
    ("attention.layer_norm_rms_epsilon", get("rms_norm_eps", default=1e-6)),
    ("attention.key_length", get("head_dim", default=256)),
    ("attention.value_length", get("head_dim", default=256)),
    ("rope.freq_base", lambda c: rope(c).get("rope_theta", 1e6)),
    ("final_logit_softcapping", lambda c: c.get("final_logit_softcapping") or None),
    ("attention.sliding_window",
     lambda c: c["sliding_window"] if c.get("sliding_window_pattern") != 1 else None),
    ("attention.head_count_kv", get("num_key_value_heads", default=4)),
    ("attention.sliding_window_pattern", _swa_pattern),
))
_QWEN3MOE = HFFamily("qwen3moe", sentencepiece_first=False, meta=(
    ("expert_feed_forward_length", get("moe_intermediate_size")),
    ("expert_shared_feed_forward_length", get("shared_expert_intermediate_size")),
    # transformers' default is False; llama.cpp always normalises (real Qwen3-MoE sets True)
    ("expert_weights_norm", lambda c: bool(c.get("norm_topk_prob", False))),
))


def _deepseek(default_gating: ExpertGatingFuncType) -> HFFamily:
    return HFFamily("deepseek2", split_kv_b=True, sentencepiece_first=False, meta=(
        # MLA runs as multi-query attention over the latent: one K/V "head"
        ("attention.head_count_kv", lambda c: 1),
        ("leading_dense_block_count", get("first_k_dense_replace", default=0)),
        ("vocab_size", get("vocab_size")),
        ("attention.q_lora_rank", get("q_lora_rank")),
        ("attention.kv_lora_rank", get("kv_lora_rank", default=512)),
        ("attention.key_length", lambda c: c["kv_lora_rank"] + c["qk_rope_head_dim"]),
        ("attention.value_length", get("kv_lora_rank")),
        ("attention.key_length_mla", lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"]),
        ("attention.value_length_mla", get("v_head_dim")),
        ("expert_feed_forward_length", get("moe_intermediate_size", "intermediate_size")),
        ("expert_count", get("n_routed_experts")),
        ("expert_shared_count", get("n_shared_experts", default=0)),
        ("expert_weights_scale", get("routed_scaling_factor")),
        ("expert_weights_norm", lambda c: True if c.get("norm_topk_prob") else None),
        ("rope.dimension_count", get("qk_rope_head_dim")),
        ("rope.scaling.yarn_log_multiplier",
         lambda c: 0.1 * rope(c)["mscale_all_dim"] if rope(c).get("mscale_all_dim") else None),
        # transformers' DeepSeek-V3 config has no scoring_func; V3 scores with a sigmoid
        ("expert_gating_func", lambda c: _gating(c) or default_gating.value),
    ))


HF_FAMILIES: dict[str, HFFamily] = {
    "llama": _LLAMA,
    "mistral": _MISTRAL,
    "mixtral": _LLAMA,
    "qwen2": HFFamily("qwen2"),
    "qwen3": HFFamily("qwen3"),
    "qwen3_moe": _QWEN3MOE,
    "gemma3_text": _GEMMA3,
    "deepseek_v2": _deepseek(ExpertGatingFuncType.SOFTMAX),
    "deepseek_v3": _deepseek(ExpertGatingFuncType.SIGMOID),
}


@dataclass(frozen=True)
class Multimodal:
    """A vision-language config.json whose text model diptych runs: its `text_config` under
    `text_type` (with the defaults its config class gives the fields real files leave out),
    its language model's tensors under `prefixes`, the other towers' dropped."""
    text_type: str
    defaults: Config
    prefixes: tuple[tuple[str, str], ...]   # (saved prefix, text model prefix)


MULTIMODAL = {
    # Gemma3ForConditionalGeneration; transformers' Gemma3TextConfig defaults (4-27B files'
    # text_config leaves most of them out)
    "gemma3": Multimodal("gemma3_text", dict(
        vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        rms_norm_eps=1e-6, max_position_embeddings=131072, query_pre_attn_scalar=256,
        sliding_window=4096, rope_theta=1e6, rope_local_base_freq=10000.0), (
        ("language_model.model.", "model."), ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."))),
}


def text_model(c: Config) -> tuple[Config, Callable[[str], str | None]]:
    """The text model's config of a config.json, and the map from its saved tensor names to
    the text model's (None: a tensor of another tower). Text-only configs pass through."""
    mm = MULTIMODAL.get(c.get("model_type"))
    if mm is None:
        return c, lambda name: name
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedModelError(f"a {c['model_type']!r} config.json without text_config")
    tied = {"tie_word_embeddings": c["tie_word_embeddings"]} if "tie_word_embeddings" in c else {}
    config = {**mm.defaults, **tied, **text, "model_type": mm.text_type}

    def rename(name: str) -> str | None:
        return next((new + name[len(old):] for old, new in mm.prefixes
                     if name.startswith(old)), None)
    return config, rename


def hf_family(model_type: str | None) -> HFFamily:
    try:
        return HF_FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"config.json model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(HF_FAMILIES))} (and the text model of {', '.join(MULTIMODAL)})"
        ) from None


def arch_metadata(family: HFFamily, c: Config) -> dict[str, Any]:
    """Every `<arch>.` metadata key for `c`, None values dropped."""
    values = common_meta(c)
    values.update({key: f(c) for key, f in family.meta})
    return {f"{family.arch}.{k}": v for k, v in values.items() if v is not None}
