"""The MLX backend on the real models: the same bar against llama.cpp as the torch backend,
and agreement with the torch backend. MLX's CPU build is slow (reference BLAS, ~2 tok/s for
Qwen), so to keep CI short the checks run on a prefix of the reference data: the first 64
corpus positions and 2 of the 20 greedy prompts for SmolLM2, 16 teacher-forced positions
for Qwen (still every block type of its file; its decode steps run the same quantized
products as SmolLM2's, so greedy decoding is checked on SmolLM2 alone)."""

import pytest

import diptych

from ..reference_metrics import greedy_failures, kl_ref_ours, load_reference, top1_agreement

pytest.importorskip("mlx.core")

# model -> (teacher-forced corpus positions, greedy prompts)
BUDGET = {"smollm2": (64, 2), "qwen2": (16, None)}


@pytest.fixture(scope="module", params=["smollm2", "qwen2"])
def pair(request):
    path = request.getfixturevalue("smollm2_path" if request.param == "smollm2" else "qwen_path")
    mlx = diptych.load(path, backend="mlx", n_ctx=512)
    torch_model = request.getfixturevalue(request.param)
    return mlx, torch_model, load_reference(request.param), BUDGET[request.param]


def test_teacher_forced_logits_agree_with_llama_cpp_and_torch(pair):
    mlx, torch_model, ref, (positions, _) = pair
    rows = slice(0, positions)  # inside the first corpus segment
    ids = ref["corpus_tokens"][rows].tolist()
    ours = mlx.logits(ids)
    top = top1_agreement(ours, ref["corpus_topk_ids"][rows], ref["corpus_topk_logits"][rows])
    assert top["agree_outside_ties"] >= 0.99, top["mismatches"]
    kl, _ = kl_ref_ours(ours, ref["corpus_topk_ids"][rows], ref["corpus_topk_logits"][rows],
                        ref["corpus_logsumexp"][rows])
    assert kl.mean() <= 0.01
    theirs = torch_model.logits(ids)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("pair", ["smollm2"], indirect=True)
def test_greedy_tokens_agree_with_llama_cpp_up_to_near_ties(pair):
    mlx, _, ref, (_, n_prompts) = pair
    assert not greedy_failures(mlx, ref, n_prompts)
