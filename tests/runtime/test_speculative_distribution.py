"""Speculative sampling on a tiny model with an 8-token vocabulary: the first 3 tokens it
generates follow the exact joint distribution enumerated from the target."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

from diptych.inference import engine as engine_module
from diptych.inference import speculative
from diptych.inference.sampler import Sampler
from diptych.inference.sampling import SamplingParams
from diptych.load_plan import LoadPlan
from diptych.sources.convert import convert

from ..speculative_stats import chi_square, power, threshold
from ..tiny_models import perturbed_copy, tiny_hf_model, tiny_tokenizer

V, NEW = 8, 3
PROMPT = [1, 3, 4, 3, 6]
ALPHA = 1e-3
TV = 0.03
PARAMS = {   # temperature below 1 and top-p; top-k 2 and a repetition penalty
    "top-p": SamplingParams(temperature=0.8, top_p=0.6, seed=0),
    # a window of one token: each position is penalised for the token just before it
    "repetition penalty": SamplingParams(temperature=1.0, top_k=2, repetition_penalty=4.0,
                                         penalty_last_n=1, seed=0),
}


class Tok:  # what the emitter needs of a tokenizer; no end-of-generation token
    eog_ids = frozenset()

    def is_special(self, token_id):
        return False

    def token_bytes(self, token_id):
        return b"x"


def _gguf(model, path):
    folder = path.with_suffix(".hf")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    tiny_tokenizer(folder, "spm", 128)   # ids past 7 never occur: the model has 8 rows
    convert(folder, path, "F32")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(path, logits table) of the target and of the draft (a perturbed copy, noise as large as each
    tensor's spread): the logits after every prefix the first 3 tokens need, PROMPT and up
    to 2 tokens more, computed by the real engine."""
    folder = tmp_path_factory.mktemp("v8")
    target = tiny_hf_model("llama", seed=3, vocab_size=V)
    draft = perturbed_copy(target, 1.0)
    out = []
    for hf, name in ((target, "t"), (draft, "d")):
        path = _gguf(hf, folder / f"{name}.gguf")
        eng = LoadPlan.open(path, "torch", n_ctx=32).engine()
        table = {}
        for a, b in itertools.product(range(V), repeat=2):
            eng.reset()
            rows = eng.eval(PROMPT + [a, b], all_logits=True)
            for i in range(len(PROMPT) - 1, len(PROMPT) + 2):
                table[tuple((PROMPT + [a, b])[:i + 1])] = rows[i]
        out.append((path, table))
    return out


def _exact_joint(table, params) -> np.ndarray:
    """P(first 3 tokens) under the target's own filtered distributions."""
    from diptych.backends.torch.cpu.backend import CpuBackend

    be = CpuBackend()
    sampler = Sampler(be, params, V)
    joint = np.zeros((V,) * NEW)
    for seq in itertools.product(range(V), repeat=NEW):
        prob = 1.0
        for i in range(NEW):
            prefix = PROMPT + list(seq[:i])
            logits = be.prepare_vector(table[tuple(prefix)]).reshape(1, V)
            probs = sampler.sample(logits, sampler.history([prefix]), probs=True).probs
            prob *= float(be.to_numpy(probs)[0, seq[i]])
            if prob == 0:
                break
        joint[seq] = prob
    return joint


def _tabulated(self, start, tokens, positions, arrays, logits_at):
    """Sequence._graph answered from the engine's table of logits per prefix."""
    be = self.engine.backend
    ids = self.cache.tokens[:start] + be.to_numpy(tokens)[0].astype(int).tolist()
    at = [len(ids) - start - 1] if logits_at is None else [int(i) for i in logits_at]
    rows = np.stack([self.engine.table[tuple(ids[:start + i + 1])] for i in at])
    return be.prepare_vector(rows.ravel()).reshape(1, len(at), V)


def _unfiltered_q(drafter):
    """The broken rule: q is the draft's raw softmax, not the distribution it sampled from."""
    sample = drafter.sampler.sample

    def raw(logits, *args, **kw):
        drawn = sample(logits, *args, **kw)
        be = drafter.sampler.backend
        drawn.probs = be.softmax(be.float32(logits))
        return drawn

    drafter.sampler.sample = raw
    return drafter


BROKEN = {   # rule -> (its parameters, how to break it)
    "residual = p": ("top-p", lambda mp: mp.setattr(speculative, "residual",
                                                          lambda p, q: p)),
    "unfiltered q": ("top-p", None),
    "no bonus token": ("top-p", lambda mp: mp.setattr(
        speculative, "emitted_tokens",
        lambda d, n, t: list(d[:n]) + ([t] if n < len(d) or not d else []))),
    "penalties not updated": ("repetition penalty", lambda mp: mp.setattr(
        speculative, "row_histories",
        lambda h, d: [list(h.windows[0])] * (len(d) + 1))),
}


def sample_first_tokens(pair, params, n: int, joint=None, broken_q=False):
    """Counts of the first 3 tokens over n seeded speculative generations, and whether every
    pass emitted its accepted drafts and exactly one target token. With `joint`, stop early,
    at a multiple of 1000 draws, once the counts so far fail the test."""
    engines = []
    for path, table in pair:
        eng = LoadPlan.open(path, "torch", n_ctx=32, max_rollback=2).engine()
        eng.table = table
        engines.append(eng)
    target, draft = engines
    counts, one_target_token = np.zeros((V,) * NEW), True
    for i in range(n):
        p = replace(params, seed=i)
        drafter = speculative.ModelDraft(draft.main, p, V)
        pieces = list(speculative.stream_speculative(
            target, Tok(), PROMPT, NEW, p, None, _unfiltered_q(drafter) if broken_q else drafter,
            speculative.DraftLength(2, speculative.Costs(0.0, 0.0))))
        ids = tuple(t for piece in pieces for t in piece.token_ids)
        t = pieces[-1].timings
        one_target_token &= t.generated_tokens == 1 + t.accepted + t.verify_passes
        counts[ids] += 1
        if joint is not None and (not one_target_token
                                  or (i + 1) % 1000 == 0 and not _passes(counts, joint)):
            break
    return counts, one_target_token


def _passes(counts, joint) -> bool:
    stat, df = chi_square(counts, joint)
    return stat <= threshold(df, ALPHA)


def _draws(joint) -> int:
    """The least multiple of 1000 draws that detect a total-variation distance TV with
    probability >= 0.99 over the joint's support."""
    df = chi_square(joint * 1e9, joint)[1]
    return next(n for n in range(1000, 100_001, 1000) if power(df, n, TV, ALPHA) >= 0.99)


@pytest.mark.parametrize("name", list(PARAMS))
def test_first_three_tokens_follow_the_exact_joint(pair, name, monkeypatch):
    """n seeded speculative generations of 3 tokens (a draft model; one draft per pass, as
    max_tokens 3 allows) against the exact joint of the target's first 3 tokens, by
    Pearson chi-square at level 1e-3. n is the least multiple of 1000 for which the test
    detects a total-variation distance of 0.03 with probability >= 0.99 (the non-central
    chi-square bound 4 n d^2 over the joint's support: with top-k 2, 8 outcomes and
    n = 15000; top-p: as many as the support needs). The graph is replaced by the models'
    own logits tabulated per prefix (computed by the real engine in the fixture), so that
    10^4 generations fit in seconds; caches, rollbacks, sampler and verification are the
    real ones."""
    params = PARAMS[name]
    joint = _exact_joint(pair[0][1], params)
    monkeypatch.setattr(engine_module.Sequence, "_graph", _tabulated)
    counts, one_target_token = sample_first_tokens(pair, params, _draws(joint))
    assert one_target_token
    assert _passes(counts, joint)


@pytest.mark.parametrize("rule", list(BROKEN))
def test_broken_rules_fail(pair, rule, monkeypatch):
    """Each named broken rule fails the test above on the parameters that expose it, the
    draft drafting whatever its confidence: its counts leave the exact joint (checked every
    1000 draws, up to the test's number; a broken rule is stopped as soon as it fails), or
    a pass emits no target token."""
    name, breaks = BROKEN[rule]
    params = PARAMS[name]
    joint = _exact_joint(pair[0][1], params)
    monkeypatch.setattr(engine_module.Sequence, "_graph", _tabulated)
    monkeypatch.setattr(speculative, "P_MIN", 0.0)   # a draft at every chance to go wrong
    if breaks is not None:
        breaks(monkeypatch)
    counts, one_target_token = sample_first_tokens(pair, params, _draws(joint), joint,
                                                   broken_q=rule == "unfiltered q")
    assert not (one_target_token and _passes(counts, joint))
