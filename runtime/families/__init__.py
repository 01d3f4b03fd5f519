"""Model families: each maps a GGUF file's metadata and tensor names onto ModelConfig.

A family is data: a few switches and the metadata prefix, not a copy of the transformer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    arch: str
    # llama.cpp's converter permutes Q/K rows of these archs for interleaved RoPE; we undo it
    # at load so that every family uses NeoX (half-split) RoPE on Hugging Face-ordered rows.
    permuted_qk: bool
    qkv_bias: bool


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", permuted_qk=True, qkv_bias=False),
    "qwen2": Family("qwen2", permuted_qk=False, qkv_bias=True),
}


def family_for(arch: str) -> Family:
    try:
        return FAMILIES[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def config_from_gguf(metadata: Mapping, tensor_shapes: Mapping[str, tuple]) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (`<arch>.*` keys) and the tensor table."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError("GGUF metadata has no general.architecture")
    fam = family_for(arch)

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in metadata:
            raise ModelFileError(f"GGUF metadata lacks {full}")
        return metadata[full]

    n_heads = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    n_kv = metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = int(metadata.get(f"{arch}.attention.key_length", d_model // n_heads))
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None:
        raise ModelFileError("GGUF file has no token_embd.weight tensor")
    vocab = int(metadata.get(f"{arch}.vocab_size", embd[0]))
    cfg = ModelConfig(
        arch=arch,
        name=str(metadata.get("general.name", arch)),
        n_layers=int(need("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(metadata.get(f"{arch}.rope.dimension_count", head_dim)),
        qkv_bias=fam.qkv_bias and "blk.0.attn_q.bias" in tensor_shapes,
        tied_output="output.weight" not in tensor_shapes,
    )
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_shapes:
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported yet")
    if cfg.n_heads % cfg.n_kv_heads or cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFileError(f"inconsistent attention shape in metadata: {cfg}")
    return cfg
