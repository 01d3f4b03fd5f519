"""diptych's perplexity of SmolLM2 against llama.cpp's own `llama-perplexity` on the same
text (tests/fixtures/perplexity_smollm2.json, from scripts/make_perplexity_fixture.py).

We dequantize the Q4_1 weights exactly, so our figure on the Q4_1 file is the figure of an
F32 file holding the same weights; llama-perplexity on that F32 file, whose matrix products
take fp32 activations, gives 13.5546 with an f16 or an f32 KV cache, ours 13.5547: the
method, the chunks, the tokens and the model agree (the issue's bar is 0.5%; we hold them
to 0.1%). On the Q4_1 file itself llama.cpp gives 13.706, 1.1% higher: the weights' values
are the same, so the difference is its quantized matrix products, which round every input
to 8 bits per 32 values (q8_1 / q8_0 blocks) and add in integers and fp16 block sums.
With `numerics="llama.cpp"` we round as it does, and meet its figures on the Q4_1 file and
on the Qwen2.5-Coder Q4_K_M file (q8_0 and q8_K rounding) within the issue's 0.5%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import diptych
from diptych.inference.perplexity import perplexity

pytestmark = pytest.mark.real

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "perplexity_smollm2.json"


def test_perplexity_equals_llama_perplexity_on_the_same_weights(smollm2_path, monkeypatch):
    """With an fp32 KV cache (the CPU default, fp16, moves ours by 2e-4): transformers'
    exact fp32 figure to 1e-5, and llama-perplexity's on the F32 file to 0.1%, with its
    default f16 KV cache and with an f32 one."""
    ref = json.loads(FIXTURE.read_text())
    assert ref["model_file"] == Path(smollm2_path).name
    monkeypatch.setenv("DIPTYCH_KV_TYPE", "f32")
    model = diptych.load(smollm2_path, backend="torch", n_ctx=ref["ctx"])
    assert model.tokenize((FIXTURE.parent / "eval_corpus.txt").read_text(encoding="utf-8"),
                          special=False) == ref["tokens"]
    result = perplexity(model, ref["tokens"], ref["ctx"])
    assert result.n_scored == ref["n_scored"]
    assert result.ppl == pytest.approx(ref["fp32_ppl"], rel=1e-5)
    assert result.ppl == pytest.approx(ref["f32_file_f32_kv_ppl"], rel=1e-3)
    assert result.ppl == pytest.approx(ref["f32_file_ppl"], rel=1e-3)


def test_llama_cpp_numerics_give_llama_perplexity_on_the_q4_1_file(smollm2_path, monkeypatch):
    """llama.cpp's figure on the Q4_1 file within 0.5%, more than half the way from the
    exact one."""
    ref = json.loads(FIXTURE.read_text())
    monkeypatch.delenv("DIPTYCH_KV_TYPE", raising=False)   # fp16, llama.cpp's default
    model = diptych.load(smollm2_path, backend="torch", n_ctx=ref["ctx"], numerics="llama.cpp")
    ppl = perplexity(model, ref["tokens"], ref["ctx"]).ppl
    assert ppl == pytest.approx(ref["ppl"], rel=5e-3)
    assert abs(ppl - ref["ppl"]) < abs(ref["fp32_ppl"] - ref["ppl"]) / 2


def test_llama_cpp_numerics_give_llama_perplexity_on_a_k_quant_file(qwen_path, monkeypatch):
    """Qwen2.5-Coder-0.5B Q4_K_M (Q5_0, Q8_0, Q4_K, Q6_K weights): llama-perplexity's
    figure within 0.5%."""
    ref = json.loads(FIXTURE.read_text())
    qwen = ref["qwen"]
    assert qwen["model_file"] == Path(qwen_path).name
    monkeypatch.delenv("DIPTYCH_KV_TYPE", raising=False)
    model = diptych.load(qwen_path, backend="torch", n_ctx=ref["ctx"], numerics="llama.cpp")
    text = (FIXTURE.parent / "eval_corpus.txt").read_text(encoding="utf-8")
    assert model.tokenize(text, special=False) == qwen["tokens"]
    result = perplexity(model, qwen["tokens"], ref["ctx"])
    assert result.ppl == pytest.approx(qwen["ppl"], rel=5e-3)
