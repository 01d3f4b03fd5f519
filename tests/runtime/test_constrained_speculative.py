"""Constrained decoding with speculation, on a tiny random qwen2 pair with a byte-level BPE
vocabulary (so a JSON grammar can spell anything): the grammar masks the draft's q and the
target's p, follows each draft and rolls back with the caches. Greedy output equals plain
constrained greedy, sampled output always validates, and after every pass the grammar is in
the state of a fresh one fed the emitted tokens."""

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest

import diptych
from diptych.inference import speculative
from diptych.inference.constraint import JsonConstraint
from diptych.inference.speculative import Costs, DraftGrammar, DraftLength

from ..tiny_models import logits, perturbed_copy, save_hf_folder, tiny_hf_model
from .test_speculative import passes  # noqa: F401 - a fixture: (drafted, accepted) per pass

pytest.importorskip("llguidance")

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                         "b": {"type": "string", "maxLength": 6},
                         "c": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 3}},
          "required": ["a", "b", "c"], "additionalProperties": False,
          # a random model would otherwise pad the JSON with whitespace until max_tokens
          "x-guidance": {"whitespace_flexible": False}}
PROMPTS = ['{"a": 12, "b": "xy", "c": ["x"]} {"a": 1', 'one two, one two {"c": [']
N_NEW = 48
NEAR_TIE = 1e-3


_WORKER = ThreadPoolExecutor(1)


def in_worker(test):
    """Run the test in a worker thread, where the torch CPU backend decodes many times faster
    than in the main thread (BENCHMARKS.md, the `diptych serve` section)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return _WORKER.submit(test, *args, **kwargs).result()
    return run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target Model with a draft loaded, the target's transformers model)."""
    from diptych.sources.convert import convert

    folder = tmp_path_factory.mktemp("bpe_pair")
    target = tiny_hf_model("qwen2", seed=1, vocab_size=320)
    draft = perturbed_copy(target, 0.05)
    paths = []
    for name, model in (("t", target), ("d", draft)):
        path = folder / f"{name}.gguf"
        convert(save_hf_folder(model, folder / name, tokenizer="bpe"), path, "F32")
        paths.append(path)
    model = diptych.load(paths[0], n_ctx=160, draft=paths[1])
    # draft whatever the measured costs say (a lookup draft costs nothing)
    model._spec_costs[("draft", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    model._spec_costs[("lookup", speculative.DEFAULT_DRAFT_MAX)] = Costs(0.0, 0.0)
    return model, target


def _run(model, prompt, **kw):
    pieces = list(model.stream(prompt, N_NEW, json_schema=SCHEMA, repetition_penalty=1.0, **kw))
    return [t for p in pieces for t in p.token_ids], pieces[-1].finish_reason


def _fresh(model, tokens) -> JsonConstraint:
    """A new grammar fed `tokens` (end-of-generation tokens are no part of the value)."""
    g = JsonConstraint(model.tokenizer, model.config.vocab_size, SCHEMA)
    for t in tokens:
        if t not in model.tokenizer.eog_ids:
            g.advance(t)
    return g


def _validates(model, ids, finish):
    if finish == "stop":
        jsonschema.validate(json.loads(model.detokenize(ids[:-1])), SCHEMA)


@pytest.mark.parametrize("mode", ["draft", "lookup"])
@in_worker
def test_greedy_equals_plain_constrained_greedy(pair, passes, mode):
    model, hf = pair
    for text in PROMPTS:
        prompt = model.tokenize(text)
        plain, finish = _run(model, prompt, temperature=0, speculative=None)
        spec, _ = _run(model, prompt, temperature=0, speculative=mode)
        _validates(model, plain, finish)
        for i, (a, b) in enumerate(zip(spec, plain)):
            if a != b:   # only where the target's two best allowed tokens nearly tie
                allowed = _fresh(model, plain[:i]).allowed()
                row = logits(hf, prompt + plain[:i])[-1][:len(allowed)][allowed]
                top2 = np.sort(row)[-2:]
                assert top2[1] - top2[0] < NEAR_TIE, (text, i, a, b)
                break
        else:
            assert spec == plain, text
    assert sum(n < k for k, n in passes) >= 3 and any(n == k > 0 for k, n in passes), passes


@pytest.mark.parametrize("mode,temperature", [("draft", 0.0), ("draft", 1.0),
                                              ("lookup", 1.0)])
@in_worker
def test_grammar_after_each_pass_is_a_fresh_one_fed_the_emitted_tokens(pair, passes, mode,
                                                                       temperature):
    model, _ = pair
    prompt = model.tokenize(PROMPTS[0])
    for seed in range(3):
        params = model.sampling.with_overrides(temperature=temperature, seed=seed,
                                               repetition_penalty=1.0)
        drafter = (speculative.ModelDraft(model._draft_seq, params, model.config.vocab_size)
                   if mode == "draft" else speculative.LookupDraft(3))
        grammar = JsonConstraint(model.tokenizer, model.config.vocab_size, SCHEMA)
        gen = speculative.SpeculativeGeneration(
            model.engine.main, model.tokenizer, prompt, N_NEW, params, None, drafter,
            DraftLength(speculative.DEFAULT_DRAFT_MAX, Costs(0.1 if mode == "draft" else 0.0,
                                                             0.0)), grammar)
        pieces = gen.start()
        while not pieces[-1].finish_reason:
            pieces = gen.step()
            emitted = gen.ctx[len(prompt):]
            fresh = _fresh(model, emitted)
            assert np.array_equal(grammar.allowed(), fresh.allowed())
            assert grammar.matcher.is_accepting() == fresh.matcher.is_accepting()
        _validates(model, gen.ctx[len(prompt):], pieces[-1].finish_reason)
    assert any(n < k for k, n in passes)


@in_worker
def test_draft_distribution_is_masked_and_lookup_drafts_stop_at_a_refused_token(pair, passes):
    model, _ = pair
    params = model.sampling.with_overrides(temperature=1.0, seed=3)
    drafter = speculative.ModelDraft(model._draft_seq, params, model.config.vocab_size)
    ctx = model.tokenize(PROMPTS[0])
    grammar = JsonConstraint(model.tokenizer, model.config.vocab_size, SCHEMA)
    before = grammar.allowed()
    walk = DraftGrammar(grammar, model.tokenizer.eog_ids)
    drafts, q = drafter.propose(ctx, 6, walk)
    assert len(drafts) == 6 and q.shape[0] == 6
    rows = walk.rows(len(drafts))
    for j, token in enumerate(drafts):
        assert rows[j][token]
        assert q[j][~rows[j]].sum() == 0 and q[j].sum() > 0.99   # q lives on what's allowed
    walk.release()
    assert np.array_equal(grammar.allowed(), before)

    # a lookup draft is cut before the first token the grammar refuses at its place
    first = int(np.flatnonzero(before)[0])
    grammar.advance(first)
    refused = int(np.flatnonzero(~grammar.allowed())[0])
    grammar.rollback(1)
    walk = DraftGrammar(grammar, model.tokenizer.eog_ids)
    drafts, _ = speculative.LookupDraft(3).propose([5, 6, 7, first, refused, 9, 5, 6, 7], 4,
                                                   walk)
    assert drafts == [first] and walk.rows(1).shape == (2, len(before))
    walk.release()
    assert np.array_equal(grammar.allowed(), before)


@in_worker
def test_sampled_output_always_validates(pair, passes):
    model, _ = pair
    prompt = model.tokenize(PROMPTS[1])
    for seed in range(4):
        ids, finish = _run(model, prompt, temperature=1.0, seed=seed, speculative="draft")
        assert finish == "stop", model.detokenize(ids)
        _validates(model, ids, finish)
