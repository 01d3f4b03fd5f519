"""The quantization mixes users know by name (Q4_K_M, Q5_K_S, Q8_0, ...): which GGML type each
tensor of a model gets.

A mix has a default type; llama.cpp's quantizer (llama-quant.cpp) then gives some tensors
more bits, and the same name must mean the same file layout here:

- the output matrix (and the token embedding when it is tied to the output) gets Q6_K,
  or Q8_0 when its rows do not divide into the default type's blocks;
- attn_v gets more bits in the first/last eighth of the layers and every third layer in
  between (Q4_K_M, Q5_K_M: Q6_K), in its first layers (Q4_K_S: Q5_K; Q3_K_M: Q5_K, then
  Q4_K), or for grouped-query attention (Q2_K: Q3_K, or Q4_K from 4 query heads per KV head);
- ffn_down likewise by layer (Q4_K_M, Q5_K_M: Q6_K; Q4_K_S: Q5_K in the first eighth;
  Q3_K_M: Q5_K, then Q4_K; Q2_K: Q3_K); attn_output gets Q3_K/Q4_K in Q2_K/Q3_K_M;
- a matrix whose rows do not divide into 256-value super-blocks falls back to a 32-block
  type (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0), and to F16 when
  not even that divides;
- vectors, norms, biases and MoE routers are not quantized (they keep their type).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from diptych.errors import InvalidArgumentError

from .formats import FORMATS

T = GGMLQuantizationType

_MIX_NAMES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0",
              "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
#: mix name -> (general.file_type, default tensor type: the name without _S/_M)
MIXES: dict[str, tuple[LlamaFileType, T]] = {
    m: (LlamaFileType[f"MOSTLY_{m}"], T[re.sub(r"_[SM]$", "", m)]) for m in _MIX_NAMES}

# where the rows do not divide into the type's blocks
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# substrings of matrices that are never quantized (besides norms and routers)
_NOT_QUANTIZED = ("altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
                  "shortconv.conv.weight", "attn_rel_b.weight", "position_embd",
                  "token_types.weight", "time_mix_")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the choice depends on besides tensor names and shapes."""

    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    arch: str = "llama"

    @classmethod
    def from_metadata(cls, metadata) -> "ModelShape":
        """From a GGUF file's metadata ({arch}.block_count, attention.head_count[_kv],
        expert_count)."""
        arch = metadata["general.architecture"]

        def value(key, default):
            v = metadata.get(f"{arch}.{key}", default)
            return int(np.max(v))  # per-layer arrays: their largest value

        n_head = value("attention.head_count", 1)
        return cls(n_layer=value("block_count", 0), n_head=n_head,
                   n_head_kv=value("attention.head_count_kv", n_head),
                   n_expert=value("expert_count", 0), arch=arch)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def mix_default(mix: str) -> tuple[LlamaFileType, T]:
    """(file type, default tensor type) of a mix name (case-insensitive)."""
    try:
        return MIXES[mix.upper()]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown quantization type {mix!r} (known: {', '.join(MIXES)})") from None


def quantizable(name: str, n_dims: int) -> bool:
    """Whether llama.cpp's quantizer converts this tensor (else it keeps its type)."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name
            and not any(s in name for s in _NOT_QUANTIZED))


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"):
        if key in name:
            return "attn_v"
    for key in ("attn_k.weight", "attn_q.weight", "attn_output.weight"):
        if key in name:
            return key[:-len(".weight")]
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for extra bits: first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Chooser:
    """Per-tensor choice in llama.cpp's order (attn_v and ffn_down depend on how many came
    before)."""

    def __init__(self, mix: str, model: ModelShape, names: list[str]):
        self.mix = mix.upper()
        self.base = mix_default(mix)[1]
        self.model = model
        self.tied = "output.weight" not in names
        self.n_attn_v = sum(_category(n) == "attn_v" for n in names)
        self.i_attn_v = 0
        self.i_ffn_down = 0

    def _layer(self, name: str, counter: int) -> int:
        if self.model.n_expert > 1:  # experts' tensors need not be in layer order
            m = _LAYER.match(name)
            if not m:
                raise InvalidArgumentError(f"cannot tell the layer of tensor {name}")
            return int(m.group(1))
        return counter

    def _mixed(self, name: str, cols: int) -> T:
        mix, new, m = self.mix, self.base, self.model
        cat = _category(name)
        falcon = m.arch == "falcon"
        if cat == "output" or (self.tied and cat == "token_embd"):
            if falcon or cols % FORMATS[new].block_size:
                return T.Q8_0
            return T.Q6_K if new != T.Q8_0 else new
        if cat == "attn_v":
            i, n = self.i_attn_v, self.n_attn_v
            self.i_attn_v += 1
            if mix == "Q2_K":
                new = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
            elif mix == "Q3_K_M":
                new = T.Q5_K if i < 2 else T.Q4_K
            elif mix == "IQ4_NL" and m.n_gqa >= 4:
                new = T.Q5_K
            elif mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
                new = T.Q6_K
            elif mix == "Q4_K_S" and i < 4:
                new = T.Q5_K
            if (m.arch == "llama" and m.n_layer == 80 and m.n_head != m.n_head_kv
                    and new in (T.Q3_K, T.Q4_K)):  # llama.cpp's 70B rule
                new = T.Q5_K
            return T.Q8_0 if m.n_expert == 8 else new
        if cat == "attn_k":
            return T.Q8_0 if m.n_expert == 8 else new
        if cat == "ffn_down":
            i, n = self._layer(name, self.i_ffn_down), m.n_layer
            self.i_ffn_down += 1
            if mix == "Q2_K":
                return T.Q3_K
            if mix == "Q3_K_M":
                return (T.Q5_K if i < n // 16 else
                        T.Q4_K if not falcon or _more_bits(i, n) else T.Q3_K)
            if mix == "Q4_K_M":
                if falcon:
                    return T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
                return T.Q6_K if _more_bits(i, n) else new
            if mix == "IQ4_NL" and i < n // 8:
                return T.Q5_K
            if mix == "Q5_K_M" and _more_bits(i, n):
                return T.Q6_K
            if mix == "Q4_K_S" and not falcon and i < n // 8:
                return T.Q5_K
            return new
        if cat == "attn_output" and not falcon:
            if m.n_expert == 8:
                return T.Q5_K if mix in ("Q2_K", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M") else new
            return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K}.get(mix, new)
        return new

    def choose(self, name: str, shape: tuple[int, ...], current: T) -> T:
        if not quantizable(name, len(shape)):
            return current
        cols = shape[-1]
        new = self._mixed(name, cols)
        if cols % FORMATS[new].block_size:
            new = _FALLBACK.get(new, new)
            if cols % FORMATS[new].block_size:
                new = T.F16
        return new


def tensor_types(mix: str, model: ModelShape,
                 tensors: Iterable[tuple[str, tuple[int, ...], T]]) -> dict[str, T]:
    """name -> type for each (name, shape (row-major, in_features last), current type), as
    llama.cpp's quantizer chooses for the mix."""
    tensors = list(tensors)
    chooser = _Chooser(mix, model, [name for name, _, _ in tensors])
    chosen = {name: chooser.choose(name, tuple(shape), current)
              for name, shape, current in sorted(tensors, key=lambda t: _llama_order(t[0]))}
    return {name: chosen[name] for name, _, _ in tensors}


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp visits tensors by layer (non-layer tensors first), then by name: the order
    its attn_v / ffn_down counters follow."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)
