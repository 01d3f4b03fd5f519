"""Per-tensor type choice of each mix: llama.cpp's layer bumps and fallbacks for rows not
divisible by 256."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from diptych.errors import InvalidArgumentError
from diptych.quant.mixes import ModelShape, mix_default, tensor_types


def test_fallbacks_and_bumps_on_a_synthetic_model():
    """A model with 256-divisible and 896-wide rows: the rules the real files may not reach."""
    names = [("token_embd.weight", (1000, 512), T.F16), ("output.weight", (1000, 896), T.F16)]
    for i in range(8):
        names += [(f"blk.{i}.attn_v.weight", (128, 512), T.F16),
                  (f"blk.{i}.ffn_down.weight", (512, 896), T.F16),
                  (f"blk.{i}.attn_norm.weight", (512,), T.F32)]
    types = tensor_types("Q4_K_M", ModelShape(n_layer=8, n_head=8, n_head_kv=2), names)
    assert types["token_embd.weight"] == T.Q4_K        # untied: the default type
    assert types["output.weight"] == T.Q8_0            # 896 % 256: Q8_0, not Q6_K
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == [
        T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q6_K]
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(8)} == {T.Q8_0, T.Q5_0}
    assert types["blk.0.attn_norm.weight"] == T.F32
    q2 = tensor_types("Q2_K", ModelShape(n_layer=8, n_head=8, n_head_kv=2), names)
    assert q2["blk.0.attn_v.weight"] == T.Q4_K        # 4 query heads per KV head
    assert q2["blk.0.ffn_down.weight"] == T.Q4_0      # Q3_K, then 896 % 256


def test_unknown_mix():
    with pytest.raises(InvalidArgumentError, match="Q4_K_M"):
        mix_default("Q4_K_X")
