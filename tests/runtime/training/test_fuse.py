"""`diptych fuse`: the merged file holds what PEFT's merge_and_unload computes, its logits are
the base's with the adapter, a quantized output stays within its rounding bound and says how
much it rounded, and bad input leaves no file."""

import numpy as np
import pytest

import diptych
from diptych.cli.main import main
from diptych.errors import InvalidArgumentError
from diptych.model.adapter_files import LoraAdapter, write_adapter
from diptych.quant.gguf_file import GGUFFile

from ...tiny_models import tiny_hf_model, write_gguf
from .random_adapter import random_adapter

IDS = [1, 5, 9, 22, 7, 40, 3, 17, 60, 2, 11, 90]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama (Q/K rows permuted in its file) in F32 and Q8_0, and an adapter folder
    with non-zero pairs on every projection."""
    folder = tmp_path_factory.mktemp("fuse")
    hf = tiny_hf_model("llama", seed=3)
    f32 = write_gguf(hf, "llama", folder / "f32.gguf")
    q8 = write_gguf(hf, "llama", folder / "q8.gguf", "Q8_0")
    model = diptych.load(f32, backend="torch", n_ctx=64)
    plain = model.logits(IDS)
    write_adapter(random_adapter(model, 4), model.config, folder / "adapter")
    model.set_adapter(folder / "adapter")
    return {"f32": f32, "q8": q8, "adapter": folder / "adapter", "plain": plain,
            "with": model.logits(IDS)}


def _logits(path):
    return diptych.load(path, backend="torch", n_ctx=64).logits(IDS)


def _kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((p * (np.log(p) - lq)).sum(-1).mean())


def test_fused_f32_holds_peft_merge_and_gives_base_plus_adapter_logits(base, tmp_path):
    from peft import PeftModel

    result = diptych.fuse(base["f32"], base["adapter"], tmp_path / "fused.gguf")
    assert result.errors == {} and "exact" in result.summary()
    assert len(result.fused) == 2 * 7   # every projection of both layers
    got = _logits(result.path)
    assert np.abs(got - base["with"]).max() <= 1e-4 * np.abs(base["with"]).max()
    # PEFT merges the same adapter into the Hugging Face model; our converter writes it
    merged = PeftModel.from_pretrained(tiny_hf_model("llama", seed=3),
                                       base["adapter"]).merge_and_unload()
    oracle = write_gguf(merged, "llama", tmp_path / "peft_merged.gguf")
    with GGUFFile(result.path) as ours, GGUFFile(oracle) as peft:
        assert set(ours.tensors) == set(peft.tensors)
        for name in result.fused:
            want = peft.tensors[name].dequantize()
            assert np.abs(ours.tensors[name].dequantize() - want).max() <= \
                1e-5 * np.abs(want).max(), name


def test_fused_f16_is_within_half_precision(base, tmp_path):
    result = diptych.fuse(base["f32"], base["adapter"], tmp_path / "f16.gguf", "F16")
    assert set(result.errors) == {n for n, t in GGUFFile(result.path).tensors.items()
                                  if t.ggml_type.name == "F16"}
    assert max(result.errors.values()) < 4e-4   # fp16 keeps 11 significant bits
    assert _kl(base["with"], _logits(result.path)) < 1e-5


def test_fusing_into_a_quantized_base_requantizes_and_measures_it(base, tmp_path):
    result = diptych.fuse(base["q8"], base["adapter"], tmp_path / "q8.gguf")
    with GGUFFile(result.path) as f:
        assert {f.tensors[n].ggml_type.name for n in result.fused} == {"Q8_0"}
    assert set(result.errors) == set(result.fused)
    # Q8_0 rounds each value to 1/127 of its block's largest magnitude
    assert 1e-4 < max(result.errors.values()) < 1e-2
    with_adapter = diptych.load(base["q8"], backend="torch", n_ctx=64,
                                adapter=base["adapter"]).logits(IDS)
    # rounding the merged matrices again costs less than rounding the base to Q8_0 did
    assert _kl(with_adapter, _logits(result.path)) < _kl(base["plain"], _logits(base["q8"]))


def test_cli_fuse_prints_the_rounding_error(base, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    assert main(["fuse", str(base["f32"]), str(base["adapter"]), str(out), "--type",
                 "q4_k_m"]) == 0
    printed = capsys.readouterr().out
    assert "14 matrices merged" in printed and "relative RMS" in printed
    with GGUFFile(out) as f:   # 64-wide rows fall back from Q4_K to Q5_0, as llama.cpp's
        assert f.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q5_0"


def test_an_adapter_for_another_model_is_refused_and_writes_nothing(base, tmp_path):
    other = LoraAdapter({(0, "q_proj"): (np.ones((2, 32), np.float32),
                                         np.ones((64, 2), np.float32))}, alpha=2, rank=2)
    cfg = diptych.load(base["f32"], backend="torch", n_ctx=64).config
    write_adapter(other, cfg, tmp_path / "other")
    with pytest.raises(InvalidArgumentError, match="another model"):
        diptych.fuse(base["f32"], tmp_path / "other", tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="unknown output type"):
        diptych.fuse(base["f32"], base["adapter"], tmp_path / "x.gguf", "Q7")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*part")) == []
