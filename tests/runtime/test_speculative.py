"""Speculative decoding on tiny random models of every family (full, ring and MLA caches, MoE)
with a draft that is a perturbed copy of the target, on every backend (torch on the CPU, the
CUDA backend under the Triton interpreter, MLX): greedy output equals plain greedy, each
prompt goes through rejections and a fully accepted block with its bonus token, and after
generation both caches hold exactly the emitted tokens, with the K/V a fresh forward gives."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before the Triton kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diptych
from diptych.backends.torch.cpu import int8_activations
from diptych.errors import IncompatibleDraftError, InvalidArgumentError
from diptych.inference import speculative
from diptych.inference.speculative import Costs

from diptych.sources.convert import convert

from ..tiny_models import (FAMILIES, logits, perturbed_copy, save_hf_folder, tiny_hf_model,
                          write_gguf)

PROMPT = [int(i) for i in np.random.default_rng(1).integers(3, 128, 12)]
N_NEW = 40   # past the ring of window 8 several times
N_NEW_INTERPRETED = 24   # under Triton's interpreter: still past that ring twice
NEAR_TIE = 1e-3  # fp32: a batched verify step rounds differently from a one-token step


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """family -> (target model, draft model (its weights perturbed by 5% of each tensor's
    spread), their F32 GGUF files), built once."""
    made = {}

    def get(family):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            target = tiny_hf_model(family, seed=1)
            draft = perturbed_copy(target, 0.05)
            made[family] = (target, draft, write_gguf(target, family, folder / "t.gguf"),
                            write_gguf(draft, family, folder / "d.gguf"))
        return made[family]

    return get


def _backend(name):
    if name == "mlx":
        pytest.importorskip("mlx.core")
        from diptych.backends.mlx.backend import MLXBackend

        return MLXBackend("cpu")
    if name == "cuda":
        pytest.importorskip("triton")
        from diptych.backends.torch.cuda.backend import CudaBackend

        return CudaBackend("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    from diptych.backends.torch.cpu.backend import CpuBackend

    return CpuBackend()


@pytest.fixture
def passes(monkeypatch):
    """(drafted, accepted) of every verify pass, read where a pass emits its tokens."""
    seen = []
    emitted = speculative.emitted_tokens

    def spy(drafts, n, token):
        seen.append((len(drafts), n))
        return emitted(drafts, n, token)

    monkeypatch.setattr(speculative, "emitted_tokens", spy)
    # tiny random models are unsure of every token: draft whatever their confidence
    monkeypatch.setattr(speculative, "P_MIN", 0.0)
    # and their replies are short: lengths from the estimate from the first pass on, which
    # vary more than the first passes' longest drafts (rejections and full blocks both)
    monkeypatch.setattr(speculative, "EVIDENCE", 0)
    return seen


def _greedy_ids(model, prompt, n=N_NEW, **kw):
    return [t for p in model.stream(prompt, n, temperature=0, repetition_penalty=1.0, **kw)
            for t in p.token_ids]


def _assert_same_up_to_near_tie(spec, plain, target_logits):
    """spec equals plain, or they part where the target's top-2 gap is below NEAR_TIE."""
    for i, (a, b) in enumerate(zip(spec, plain)):
        if a != b:
            top2 = np.sort(target_logits[len(PROMPT) + i - 1])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (i, a, b)
            return
    assert len(spec) == len(plain)


def _check_cache(seq, backend, hf, ids):
    """The sequence holds ids[:-1], and its next logits are transformers' on ids."""
    assert seq.tokens == ids[:-1]
    ref = logits(hf, ids)[-1]
    got = backend.to_numpy(seq.eval([ids[-1]]))[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    seq.rollback(1)


CACHE_KINDS = ("llama", "mistral", "deepseek_v2", "qwen3moe")  # full, ring, MLA, MoE


# the Triton interpreter takes minutes per model: the wrapping ring, the hardest rollback
@pytest.mark.parametrize("backend_name,family",
                         [("torch", f) for f in FAMILIES] + [("mlx", f) for f in CACHE_KINDS]
                         + [("cuda", "mistral")])
def test_draft_greedy_equals_plain_and_leaves_both_caches_exact(tiny_pair, passes,
                                                                backend_name, family):
    target_hf, draft_hf, target_path, draft_path = tiny_pair(family)
    backend = _backend(backend_name)
    model = diptych.load(target_path, backend=backend, n_ctx=96, draft=draft_path)
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    n, plain_model = N_NEW, model
    if backend_name == "cuda" and not torch.cuda.is_available():
        # each step takes a second under Triton's interpreter: plain greedy from the torch
        # CPU backend (fp32 as well; the near-tie rule covers their rounding)
        n, plain_model = N_NEW_INTERPRETED, diptych.load(target_path, n_ctx=96)
    plain = _greedy_ids(plain_model, PROMPT, n, speculative=None)
    spec = _greedy_ids(model, PROMPT, n)
    _assert_same_up_to_near_tie(spec, plain, logits(target_hf, PROMPT + plain))
    rejections = sum(n < k for k, n in passes)
    full = sum(n == k > 0 for k, n in passes)
    assert rejections >= 3 and full >= 1, passes
    ids = PROMPT + spec
    _check_cache(model.engine.main, backend, target_hf, ids)
    _check_cache(model._draft_seq, model.draft.backend, draft_hf, ids)


def _step_rows(seq):
    """Every logits row seq's steps compute, by the position of its input token (a later
    step at a position, after a rollback, replaces the earlier one)."""
    rows, step = {}, seq.step

    def spy(ids):
        start, out = seq.n_cached, step(ids)
        for j, row in enumerate(np.asarray(out[0])):
            rows[start + j] = row.copy()
        return out

    seq.step = spy
    return rows


@pytest.mark.skipif(not int8_activations.SUPPORTED, reason="no int8 activations on this CPU")
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])   # full, ring, rings
def test_int8_speculative_output_is_plain_decodings_exactly(tmp_path, passes, family):
    """numerics "fast" on the CPU (int8 activations): a verify step gives one-position steps'
    bits, so speculative greedy output is plain greedy output with no near-tie margin, and
    the target's logits at every emitted position are the very bits plain decoding
    computed there, through rejections and full blocks, past the rings' windows."""
    target = tiny_hf_model(family, seed=1)
    target_path = write_gguf(target, family, tmp_path / "t.gguf", "Q8_0")
    draft_path = write_gguf(perturbed_copy(target, 0.05), family, tmp_path / "d.gguf", "Q8_0")
    model = diptych.load(target_path, backend="torch", device="cpu", n_ctx=96, n_batch=16,
                         draft=draft_path, numerics="fast")
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    model._spec_costs[("lookup", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.0, 0.0)
    rings = [s.slots for s in model.engine.main.cache.specs if s.window]
    assert all(slots < len(PROMPT) + N_NEW for slots in rings)   # they wrap
    rows = _step_rows(model.engine.main)
    for prompt, kw in ((PROMPT, {}), (PROMPT + PROMPT[:8] + PROMPT,
                                       dict(speculative="lookup", lookup_ngram=2))):
        # both runs prefill the whole prompt (a reused prefix recomputes its last position
        # in a one-position step, which a prefill's products and attention round otherwise)
        model.engine.reset()
        plain = _greedy_ids(model, prompt, speculative=None)
        plain_rows = dict(rows)
        rows.clear()
        model.engine.reset()
        assert _greedy_ids(model, prompt, **kw) == plain
        emitted = range(len(prompt), len(prompt) + len(plain) - 1)
        assert all(np.array_equal(rows[p], plain_rows[p]) for p in emitted)
        rows.clear()
    assert sum(n < k for k, n in passes) >= 3 and any(n == k > 0 for k, n in passes), passes


@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek_v3"])
def test_lookup_greedy_equals_plain(tiny_pair, passes, family):
    """A prompt that repeats itself, so that lookup finds drafts; a shared draft Model
    drafts in a cache of its own (its first one keeps what it held)."""
    target_hf, _, target_path, _ = tiny_pair(family)
    model = diptych.load(target_path, backend="torch", n_ctx=96)
    model._spec_costs[("lookup", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.0, 0.0)
    prompt = PROMPT + PROMPT[:8] + PROMPT
    plain = _greedy_ids(model, prompt, speculative=None)
    spec = _greedy_ids(model, prompt, speculative="lookup", lookup_ngram=2)
    full_logits = logits(target_hf, prompt + plain)
    for i, (a, b) in enumerate(zip(spec, plain)):
        if a != b:
            top2 = np.sort(full_logits[len(prompt) + i - 1])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE
            break
    assert sum(k for k, _ in passes) > 0
    _check_cache(model.engine.main, model.backend, target_hf, prompt + spec)


def test_shared_draft_model_keeps_its_own_cache(tiny_pair, passes):
    target_hf, draft_hf, target_path, draft_path = tiny_pair("mistral")
    draft = diptych.load(draft_path, backend="torch", n_ctx=96)
    alone = draft.generate(PROMPT, 5, temperature=0)
    held = draft.engine.tokens
    model = diptych.load(target_path, backend="torch", n_ctx=96, draft=draft)
    assert model._draft_seq is not draft.engine.main
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    spec = _greedy_ids(model, PROMPT)
    assert draft.engine.tokens == held
    assert draft.generate(PROMPT, 5, temperature=0) == alone
    _check_cache(model._draft_seq, draft.backend, draft_hf, PROMPT + spec)


def test_stop_inside_an_accepted_block_ends_there(tiny_pair, passes):
    """max_tokens and an end-of-generation id inside a block: nothing after it is emitted,
    and the target's cache holds exactly what was."""
    _, _, target_path, draft_path = tiny_pair("llama")
    model = diptych.load(target_path, backend="torch", n_ctx=96, draft=draft_path)
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    plain = _greedy_ids(model, PROMPT, speculative=None)
    for n in (1, 2, 7, 13):
        pieces = list(model.stream(PROMPT, n, temperature=0, repetition_penalty=1.0))
        ids = [t for p in pieces for t in p.token_ids]
        assert ids == plain[:n] and pieces[-1].finish_reason == "length"
        assert model.engine.tokens == PROMPT + ids[:-1]
    # an end-of-generation token: the 9th token of the plain output made one
    model.tokenizer.eog_ids = frozenset({plain[8]})
    first = plain.index(plain[8])
    pieces = list(model.stream(PROMPT, N_NEW, temperature=0, repetition_penalty=1.0))
    ids = [t for p in pieces for t in p.token_ids]
    assert ids == plain[:first + 1] and pieces[-1].finish_reason == "stop"
    assert model.engine.tokens == PROMPT + ids[:-1]
    t = pieces[-1].timings
    assert t.generated_tokens == len(ids)
    assert t.verify_passes and t.accepted <= t.drafted


def test_interrupt_mid_verify_leaves_both_models_usable(tiny_pair, passes, monkeypatch):
    target_hf, draft_hf, target_path, draft_path = tiny_pair("mistral")
    model = diptych.load(target_path, backend="torch", n_ctx=96, draft=draft_path)
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    expected = _greedy_ids(model, PROMPT)
    seq = model.engine.main
    step, calls = seq.step, []

    def interrupted(ids):
        calls.append(len(ids))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(ids)

    monkeypatch.setattr(seq, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _greedy_ids(model, PROMPT + [5])
    monkeypatch.setattr(seq, "step", step)
    assert _greedy_ids(model, PROMPT) == expected
    _check_cache(model.engine.main, model.backend, target_hf, PROMPT + expected)
    _check_cache(model._draft_seq, model.backend, draft_hf, PROMPT + expected)


def test_a_pass_that_drafts_nothing_is_plain_decoding_even_sampled(tiny_pair):
    """Drafting that never pays: every pass is a plain step drawn by the plain sampler, so
    with a seed the tokens are plain decoding's, and the idle draft model computed nothing."""
    _, _, target_path, draft_path = tiny_pair("llama")
    model = diptych.load(target_path, backend="torch", n_ctx=96, draft=draft_path)
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(5.0, 5.0)
    n = speculative.PROBE_EVERY - 1   # no probe yet
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    plain = [t for p in model.stream(PROMPT, n, speculative=None, **kw) for t in p.token_ids]
    pieces = list(model.stream(PROMPT, n, **kw))
    assert [t for p in pieces for t in p.token_ids] == plain
    assert pieces[-1].timings.drafted == 0 and model._draft_seq.n_cached == 0


def test_a_probe_far_behind_drafts_from_the_recent_context(tiny_pair):
    """A draft model idle for a while probes from the last PROBE_CONTEXT tokens instead of
    prefilling all it missed, and catches up in full when it drafts for real; a draft far
    behind when generation ends computes nothing."""
    _, draft_hf, target_path, draft_path = tiny_pair("mistral")
    model = diptych.load(target_path, backend="torch", n_ctx=96, draft=draft_path)
    seq, window = model._draft_seq, speculative.PROBE_CONTEXT

    def drafter():
        return speculative.ModelDraft(seq, model.sampling.with_overrides(temperature=0),
                                      model.config.vocab_size)

    ctx = PROMPT + PROMPT + PROMPT
    probing = drafter()
    probing.propose(ctx, 3, probe=True)
    assert seq.tokens[:window] == ctx[-window:] and seq.n_cached < window + 3
    probing.settle(ctx + [7])   # far behind: keeps its common prefix, computes nothing
    assert seq.n_cached == 0
    more = ctx + [5, 6]
    probing.propose(more, 3)
    assert seq.tokens[:len(more)] == more
    probing.settle(more + [7])   # close behind: catches up
    _check_cache(seq, model.draft.backend, draft_hf, more + [7])


def test_bad_requests_are_clear_errors(tiny_pair, tmp_path):
    _, _, target_path, draft_path = tiny_pair("llama")
    model = diptych.load(target_path, backend="torch", n_ctx=96)
    with pytest.raises(InvalidArgumentError, match="needs a draft model"):
        model.stream(PROMPT, 4, speculative="draft")
    with pytest.raises(InvalidArgumentError, match="speculative must be"):
        model.stream(PROMPT, 4, speculative="medusa")
    with pytest.raises(InvalidArgumentError, match="exceeds the 8 tokens"):
        model.stream(PROMPT, 4, speculative="lookup", draft_max=9)
    with pytest.raises(InvalidArgumentError, match="draft_max must be"):
        diptych.load(target_path, backend="torch", draft_max=-1)
    # a draft with another tokenizer: the first differing token is named
    folder = save_hf_folder(tiny_hf_model("llama", seed=1, vocab_size=320), tmp_path / "hf",
                            tokenizer="bpe")
    bpe = tmp_path / "bpe.gguf"
    convert(folder, bpe, "F32")
    with pytest.raises(IncompatibleDraftError, match="tokenizer kind 'bpe'"):
        diptych.load(target_path, backend="torch", n_ctx=96, draft=bpe)
