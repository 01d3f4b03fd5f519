"""`diptych perplexity`: llama-perplexity's chunked method, checked against a numpy
reference of the method over transformers' logits of the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import diptych
from diptych.cli.main import main
from diptych.errors import InvalidArgumentError
from diptych.inference.perplexity import chunk_tokens, perplexity

from ..tiny_models import logits, tiny_hf_model, write_gguf

CTX = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppl")
    base_hf = tiny_hf_model("llama", seed=3)
    other_hf = tiny_hf_model("llama", seed=4)
    return (base_hf, write_gguf(base_hf, "llama", folder / "base.gguf"),
            other_hf, write_gguf(other_hf, "llama", folder / "other.gguf"))


def _reference(hf, tokens, bos, ctx):
    """The method written out: whole chunks, BOS first, second half scored."""
    nll, n, per_pos = 0.0, 0, []
    for start in range(0, len(tokens) - ctx + 1, ctx):
        chunk = [bos] + list(tokens[start + 1:start + ctx])
        logp = logits(hf, chunk).astype(np.float64)
        logp -= logp.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        for pos in range(ctx // 2, ctx - 1):
            nll -= logp[pos, chunk[pos + 1]]
            n += 1
        per_pos.append(logp[ctx // 2:ctx - 1])
    return float(np.exp(nll / n)), n, np.concatenate(per_pos)


def test_matches_the_method_on_transformers_logits(models):
    base_hf, base_path, other_hf, other_path = models
    model = diptych.load(other_path, n_ctx=CTX)
    base = diptych.load(base_path, n_ctx=CTX)
    rng = np.random.default_rng(0)
    tokens = [model.tokenizer.bos_id] + rng.integers(3, 128, 3 * CTX + 5).tolist()
    result = perplexity(model, tokens, CTX, base=base)
    ppl, n, logp = _reference(other_hf, tokens, model.tokenizer.bos_id, CTX)
    _, _, base_logp = _reference(base_hf, tokens, model.tokenizer.bos_id, CTX)
    assert result.n_chunks == 3 and result.n_scored == n == 3 * (CTX // 2 - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-4)
    kl = (np.exp(base_logp) * (base_logp - logp)).sum(1).mean()
    assert kl > 0.05 and result.kl_mean == pytest.approx(kl, rel=1e-3)
    same = (base_logp.argmax(1) == logp.argmax(1)).mean()
    assert result.top1_agreement == pytest.approx(same)
    self_kl = perplexity(model, tokens, CTX, base=model)
    assert self_kl.kl_mean == pytest.approx(0, abs=1e-9) and self_kl.top1_agreement == 1


def test_short_text_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="needs at least 64"):
        chunk_tokens(list(range(50)), 32, None)


def test_cli(models, tmp_path, capsys):
    _, base_path, _, other_path = models
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["perplexity", str(other_path), str(text), "--ctx", "32",
                 "--kl-divergence", str(base_path)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "KL divergence" in out and "same top-1 token" in out
    assert main(["perplexity", str(other_path), str(tmp_path / "none.txt")]) == 1
    assert "cannot read the text" in capsys.readouterr().err
    # F32 weights: llama.cpp multiplies them by fp32 inputs, so its numerics change nothing
    args = ["perplexity", str(other_path), str(text), "--ctx", "32", "--backend", "torch"]
    assert main(args) == 0
    exact = capsys.readouterr().out
    assert main(args + ["--llama-cpp-numerics"]) == 0
    assert capsys.readouterr().out == exact
