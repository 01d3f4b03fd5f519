"""`diptych convert`: HF folder -> GGUF, read back equal to the folder itself."""

import numpy as np
import pytest

import diptych
from diptych.cli.main import main
from diptych.sources.convert import CONVERT_TYPES, convert
from diptych.errors import InvalidArgumentError
from diptych.sources.hf_folder import HFSource
from diptych.quant.gguf_file import GGUFFile

from ..tiny_models import FAMILIES, logits, save_hf_folder, tiny_hf_model

IDS = list(np.random.default_rng(11).integers(3, 128, 24))


def _same(a, b) -> bool:
    if isinstance(a, (np.ndarray, list)):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, float):
        return np.float32(a) == np.float32(b)  # written as f32
    return a == b


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_holds_exactly_the_folder(tmp_path, family):
    folder = save_hf_folder(tiny_hf_model(family, seed=4), tmp_path / family)
    src = HFSource(folder)
    f = GGUFFile(convert(folder, tmp_path / "m.gguf", "F32"))
    assert list(f.tensors) == list(src.tensors)
    for name, t in src.tensors.items():
        assert f.tensors[name].shape == t.shape and f.tensors[name].type_name == "F32", name
        assert np.array_equal(f.tensors[name].data, t.data), name
    for key, value in src.metadata.items():
        assert _same(value, f.metadata[key]), key
    assert f.metadata["general.file_type"] == 0


def _with_file_weights(hf, path):
    """A copy of the tiny llama `hf` holding the GGUF file's weights, dequantized."""
    import copy

    import torch

    from diptych.model.weights import unpermute_rows

    g, hf = GGUFFile(path), copy.deepcopy(hf)
    names = {"model.embed_tokens": "token_embd", "lm_head": "output"}
    for i in range(hf.config.num_hidden_layers):
        for hf_name, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                              ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                              ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                              ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{hf_name}"] = f"blk.{i}.{name}"
    heads = {"attn_q": hf.config.num_attention_heads, "attn_k": hf.config.num_key_value_heads}
    params = hf.state_dict()
    with torch.no_grad():
        for hf_name, name in names.items():
            w = g.tensors[name + ".weight"].dequantize()
            if (n_head := heads.get(name.rsplit(".", 1)[-1])) is not None:
                w = w[unpermute_rows(w.shape[0], n_head)]
            params[hf_name + ".weight"].copy_(torch.from_numpy(w))
    return hf


@pytest.mark.parametrize("type_", ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q4_0"])
def test_round_trip_logits(tmp_path, type_):
    """The converted file's logits equal transformers running the file's (dequantized)
    weights; F32 is bit-identical to loading the folder."""
    hf = tiny_hf_model("llama", seed=5)
    folder = save_hf_folder(hf, tmp_path / "m")
    path = convert(folder, tmp_path / f"m.{type_}.gguf", type_)
    ours = diptych.load(path, backend="torch", n_ctx=64).logits(IDS)
    if type_ == "F32":
        assert np.array_equal(ours, diptych.load(folder, backend="torch", n_ctx=64).logits(IDS))
    ref = logits(_with_file_weights(hf, path), IDS)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_half_precision_files_against_the_full_model(tmp_path):
    """Stated tolerances of F16 and Q8_0 files against the fp32 model (max |delta| / max
    |logit|; this random model amplifies weight error, real models far less)."""
    hf = tiny_hf_model("llama", seed=5)
    folder = save_hf_folder(hf, tmp_path / "m")
    ref = logits(hf, IDS)
    for type_, bound in (("F16", 5e-3), ("Q8_0", 0.1)):
        ours = diptych.load(convert(folder, tmp_path / f"m.{type_}.gguf", type_),
                            backend="torch", n_ctx=64).logits(IDS)
        assert np.abs(ours - ref).max() <= bound * np.abs(ref).max(), type_
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, type_


def test_types_and_fallbacks(tmp_path):
    """Vectors, norms and routers stay F32; rows that do not fill whole blocks fall back to F16."""
    folder = save_hf_folder(tiny_hf_model("mixtral", seed=6, intermediate_size=80),
                            tmp_path / "m")
    f = GGUFFile(convert(folder, tmp_path / "m.gguf", "Q4_1"))
    types = {n: t.type_name for n, t in f.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_1"
    assert types["blk.0.ffn_down_exps.weight"] == "F16"      # rows of 80: not whole blocks of 32
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert f.metadata["general.file_type"] == 3
    assert set(CONVERT_TYPES) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                  "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                                  "Q6_K", "IQ4_NL"}
    with pytest.raises(InvalidArgumentError):
        convert(folder, tmp_path / "x.gguf", "Q4_K")


def test_cli_convert(tmp_path, capsys):
    folder = save_hf_folder(tiny_hf_model("qwen2", seed=8), tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["convert", str(folder), str(out), "--type", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert GGUFFile(out).tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    assert main(["convert", str(tmp_path / "nothing"), str(out)]) == 1
    assert "no such folder" in capsys.readouterr().err
