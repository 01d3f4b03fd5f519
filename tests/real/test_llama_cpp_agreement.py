"""Real GGUF models against llama.cpp's own logits and greedy tokens (committed fixtures,
made by scripts/make_reference_fixtures.py)."""

import numpy as np
import pytest

from ..reference_metrics import (corpus_segments, greedy_failures, kl_ref_ours, load_reference,
                                 top1_agreement)

MODELS = ["smollm2", "qwen2"]


@pytest.fixture(params=MODELS)
def model_and_ref(request):
    model = request.getfixturevalue(request.param)
    ref = load_reference(request.param)
    assert ref["n_vocab"] == model.config.vocab_size
    return model, ref


def test_teacher_forced_logits_agree_with_llama_cpp(model_and_ref):
    model, ref = model_and_ref
    agree, n_out, kls = 0, 0, []
    for seg in corpus_segments(ref):
        ours = model.logits(ref["corpus_tokens"][seg].tolist())
        top = top1_agreement(ours, ref["corpus_topk_ids"][seg], ref["corpus_topk_logits"][seg])
        agree += top["n_outside_ties"] - len(top["mismatches"])
        n_out += top["n_outside_ties"]
        kl, _ = kl_ref_ours(ours, ref["corpus_topk_ids"][seg], ref["corpus_topk_logits"][seg],
                            ref["corpus_logsumexp"][seg])
        kls.append(kl)
    kl = np.concatenate(kls)
    assert len(kl) >= 1000
    assert agree / n_out >= 0.99, f"top-1 outside near-ties {agree}/{n_out}"
    assert kl.mean() <= 0.01, f"mean KL {kl.mean():.4f}"


def test_greedy_tokens_agree_with_llama_cpp_up_to_near_ties(model_and_ref):
    model, ref = model_and_ref
    assert len(ref["prompt_offsets"]) - 1 >= 20
    assert not greedy_failures(model, ref)
