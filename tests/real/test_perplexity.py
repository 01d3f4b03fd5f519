"""diptych's perplexity of SmolLM2 on llama.cpp's tokens of the eval corpus, by the chunked
method (tests/fixtures/perplexity_smollm2.json, from scripts/make_perplexity_fixture.py).

It equals the method over an exact fp32 evaluation (transformers on the dequantized weights)
to 1e-5; llama.cpp's own figure is about 1.2% higher on this Q4_1 model, because it rounds
activations to 8 bits in its quantized dot products."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import diptych
from diptych.inference.perplexity import perplexity

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "perplexity_smollm2.json"


def test_perplexity_matches_the_references(smollm2_path, monkeypatch):
    # the exact-fp32 comparison needs an fp32 KV cache (the CPU default stores fp16, which
    # moves this perplexity by 2e-4 relative)
    monkeypatch.setenv("DIPTYCH_KV_TYPE", "f32")
    smollm2 = diptych.load(smollm2_path, backend="torch", n_ctx=2048)
    ref = json.loads(FIXTURE.read_text())
    assert ref["model_file"] == smollm2.path.name
    assert smollm2.tokenize((FIXTURE.parent / "eval_corpus.txt").read_text(encoding="utf-8"),
                            special=False) == ref["tokens"]
    result = perplexity(smollm2, ref["tokens"], ref["ctx"])
    assert result.n_scored == ref["n_scored"]
    assert result.ppl == pytest.approx(ref["fp32_ppl"], rel=1e-5)
    assert result.ppl == pytest.approx(ref["ppl"], rel=0.015)
