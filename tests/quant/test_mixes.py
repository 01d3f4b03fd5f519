"""Per-tensor type choice of each mix equals llama.cpp's on the real models (committed fixture
from scripts/make_quantize_fixtures.py), fallbacks for rows not divisible by 256 included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from diptych.errors import InvalidArgumentError
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.mixes import MIXES, ModelShape, mix_default, tensor_types

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "quantize_llama_cpp.json"


@pytest.mark.parametrize("model", ["smollm2", "qwen2", "gemma3"])
def test_same_types_as_llama_cpp(model, request):
    fixture = json.loads(FIXTURE.read_text())["mixes"][model]
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen2": "qwen_path",
                                    "gemma3": "gemma3_path"}[model])
    with GGUFFile(path) as f:
        shape = ModelShape.from_metadata(f.metadata)
        tensors = [(name, t.shape, t.ggml_type) for name, t in f.tensors.items()]
    assert sorted(name for name, _, _ in tensors) == sorted(fixture["tensors"])
    assert set(fixture["types"]) == set(MIXES)
    for mix, expected in fixture["types"].items():
        ours = tensor_types(mix, shape, tensors)
        diff = [(n, ours[n].name, e) for n, e in zip(fixture["tensors"], expected.upper().split())
                if ours[n].name != e]
        assert not diff, f"{mix}: (tensor, ours, llama.cpp) {diff[:5]}"


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
