"""Real GGUF models against llama.cpp's own logits and greedy tokens (committed fixtures,
made by scripts/make_reference_fixtures.py)."""

import numpy as np
import pytest

import diptych

from ..reference_metrics import (KL_BOUNDS, PLAIN_GREEDY, corpus_agreement, greedy_check,
                                 greedy_failures, kl_ref_ours, load_reference, top1_agreement)

MODELS = ["smollm2", "qwen2", "gemma3"]


@pytest.fixture(params=MODELS)
def model_and_ref(request):
    model = request.getfixturevalue(request.param)
    ref = load_reference(request.param)
    assert ref["n_vocab"] == model.config.vocab_size
    return model, ref, request.param


def test_teacher_forced_logits_agree_with_llama_cpp(model_and_ref):
    model, ref, name = model_and_ref
    agree, kl = corpus_agreement(model, ref)
    assert len(kl) >= 1000
    assert agree >= 0.99, f"top-1 outside near-ties {agree:.4f}"
    mean_bound, p95_bound = KL_BOUNDS[name]
    p95 = np.quantile(kl, 0.95)
    assert kl.mean() <= mean_bound and p95 <= p95_bound, (
        f"KL mean {kl.mean():.4f} (bound {mean_bound}), "
        f"95th percentile {p95:.4f} (bound {p95_bound})")


def test_greedy_tokens_agree_with_llama_cpp_up_to_near_ties(model_and_ref):
    model, ref, _ = model_and_ref
    assert len(ref["prompt_offsets"]) - 1 >= 20
    assert not greedy_failures(model, ref)


def test_gemma3_past_its_sliding_window_agrees_with_llama_cpp(gemma3_path):
    """760 tokens through Gemma 3's 512-token windows, teacher-forced in chunks of 64 (its
    rings of 575 slots wrap), then greedy decoding after a 600-token prompt."""
    ref = load_reference("gemma3")
    gemma3 = diptych.load(gemma3_path, n_ctx=1024, n_batch=64)
    tokens = ref["long_tokens"].tolist()
    window = gemma3.config.sliding_window
    ring = max(s.slots for s in gemma3.engine.main.cache.specs if s.window)
    assert window == 512 and len(tokens) > ring
    ours = gemma3.logits(tokens)
    top = top1_agreement(ours, ref["long_topk_ids"], ref["long_topk_logits"])
    assert top["n_outside_ties"] >= 300
    assert len(top["mismatches"]) <= 0.01 * top["n_outside_ties"], top["mismatches"]
    kl, _ = kl_ref_ours(ours, ref["long_topk_ids"], ref["long_topk_logits"],
                        ref["long_logsumexp"])
    assert kl[window:].mean() <= 0.01 and kl.mean() <= 0.01

    prompt = tokens[:int(ref["long_prompt"])]
    got = [t for p in gemma3.stream(prompt, max_tokens=int(ref["n_greedy"]), **PLAIN_GREEDY)
           for t in p.token_ids]
    result = greedy_check(got, ref, None)
    assert result["status"] in ("match", "tie"), result


@pytest.mark.parametrize("name", ["smollm2", "qwen2"])
def test_fast_numerics_agree_with_llama_cpp(name, request):
    """numerics="fast" (int8 activations on a CPU with AVX-512 VNNI): the same teacher-forced
    bars on SmolLM2 (Q4_1, Q8_0) and Qwen2.5-Coder (Q5_0, Q8_0, Q4_K, Q6_K: Gemma's types
    too), and greedy tokens on the default model; the rest would add a minute or two of CI
    for the same kernels."""
    from diptych.backends.torch.cpu import int8_activations

    if not int8_activations.ENABLED:
        pytest.skip("no int8 activations on this CPU")
    path = request.getfixturevalue({"smollm2": "smollm2_path", "qwen2": "qwen_path"}[name])
    model = diptych.load(path, backend="torch", n_ctx=2048, numerics="fast")
    assert any(w.int8 for _, w in model.engine.weights.linears() if hasattr(w, "int8"))
    ref = load_reference(name)
    agree, kl = corpus_agreement(model, ref)
    assert agree >= 0.99, f"top-1 outside near-ties {agree:.4f}"
    mean_bound, p95_bound = KL_BOUNDS[name]
    assert kl.mean() <= mean_bound and np.quantile(kl, 0.95) <= p95_bound
    if name == "smollm2":
        assert not greedy_failures(model, ref)
