"""Checks of the runtime's sampler that every backend must pass, shared by
tests/runtime/test_sampler*.py (torch's CPU backend, MLX) and tests/backends/cuda (CUDA).

Against llama.cpp: the chain as scripts/make_sampler_fixtures.py recorded it. Tolerance:
our float32 distribution against llama.cpp's candidates renormalised in float64, within
1e-5 relative and 1e-7 absolute; the candidate sets must be identical.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from diptych.inference.sampler import Sampler
from diptych.inference.sampling import SamplingParams

LLAMA_CPP_FIXTURE = Path(__file__).parent / "fixtures" / "sampler_llama_cpp.npz"
REPEAT = 8  # the block holds every fixture row this many times: more draws, rows must not mix


def device_logits(be, rows: np.ndarray):
    """A host (R, V) array as the backend's float32 logits."""
    return be.prepare_vector(np.ascontiguousarray(rows, np.float32).ravel()).reshape(rows.shape)


def check_block_rows_equal_single_rows(be, logits: np.ndarray, histories: list[list[int]],
                                       params: SamplingParams) -> None:
    """Each row of a block, with its own history, has the distribution it has alone."""
    sampler = Sampler(be, params, logits.shape[1])
    block = sampler.sample(device_logits(be, logits), sampler.history(histories), probs=True)
    got = be.to_numpy(block.probs)
    for r, history in enumerate(histories):
        alone = sampler.sample(device_logits(be, logits[r:r + 1]), sampler.history([history]),
                               probs=True)
        np.testing.assert_allclose(got[r], be.to_numpy(alone.probs)[0], rtol=1e-6, atol=1e-9)


def check_non_finite_rows_are_flagged(be) -> None:
    """A row with a NaN or +inf anywhere, or with no finite logit, is flagged and still
    yields an in-range token (the draw does not fail on it). Not flagged: a row whose -inf
    logits sit beside finite ones (those tokens get probability 0), a row of large finite
    logits whose sum overflows, and a NaN behind the token mask (a banned token)."""
    rows = np.tile(np.random.default_rng(0).standard_normal((1, 300)), (7, 1))
    rows[0, 3], rows[1, 5], rows[2, 7], rows[6, 9] = np.nan, np.inf, -np.inf, np.nan
    rows[3] = -np.inf
    rows[4] = np.abs(rows[4]) * 1e37 + 1e37  # each finite in float32, their sum not
    rows[2, 8] = rows[2].max() + 5     # the -inf row's best token: its next one is 7
    allowed = np.ones((7, 300), np.int64)
    allowed[6, 9] = 0
    mask = be.ids(allowed) > 0
    for params in (SamplingParams(seed=0), SamplingParams(temperature=0),
                   SamplingParams(top_k=0, top_p=1.0, min_p=0.0, seed=0),
                   SamplingParams(top_k=0, top_p=0.9, min_p=0.0, seed=0),
                   SamplingParams(repetition_penalty=1.3, seed=0)):
        sampler = Sampler(be, params, 300)
        out = sampler.sample(device_logits(be, rows), sampler.history([[3, 5, 7, 9]]),
                             mask=mask, probs=True, logprobs=2)
        assert out.finite == [False, False, True, False, True, True, True], params
        assert all(0 <= t < 300 for t in out.tokens)
        probs = be.to_numpy(out.probs)
        assert probs[2, 7] == 0 and probs[6, 9] == 0


@functools.cache
def llama_cpp_fixture():
    """(logits (R, V), a history per row, {case name: (SamplingParams keywords, llama.cpp's
    distributions (R, V))})."""
    f = np.load(LLAMA_CPP_FIXTURE)
    histories = np.split(f["histories"], np.cumsum(f["history_lengths"])[:-1])
    cases = {c["name"]: (c["params"], probs)
             for c, probs in zip(json.loads(str(f["cases"])), f["probs"])}
    return f["logits"], [[int(t) for t in h] for h in histories], cases


def check_against_llama_cpp(be, name: str, as_mask: bool = False,
                            vocab: int | None = None) -> None:
    """The case's filtered distribution on every row of a block equals llama.cpp's, and
    every drawn token is one of llama.cpp's candidates. With `as_mask`, the banned (-inf
    bias) tokens go through the token mask instead of logit_bias. With `vocab`, the
    fixture's tokens are spread over a vocabulary that wide, among fillers too unlikely to
    get any probability."""
    logits, histories, cases = llama_cpp_fixture()
    (rows, width), (params, want) = logits.shape, cases[name]
    params, mask = dict(params), None
    if vocab is not None:
        ids = np.sort(np.random.default_rng(0).choice(vocab, width, replace=False))
        ids[-1] = vocab - 1
        logits, want = _spread(logits, ids, vocab, -1e4), _spread(want, ids, vocab, 0.0)
        histories = [[int(ids[t]) for t in h] for h in histories]
        params["logit_bias"] = [(int(ids[t]), b) for t, b in params.get("logit_bias", ())]
    vocab = logits.shape[1]
    if as_mask:
        banned = [t for t, b in params["logit_bias"] if b == -math.inf]
        params["logit_bias"] = [(t, b) for t, b in params["logit_bias"] if b != -math.inf]
        allowed = np.ones((1, vocab), np.int64)
        allowed[0, banned] = 0
        mask = be.ids(allowed).reshape(1, vocab) > 0
    sampler = Sampler(be, SamplingParams(**params), vocab)
    out = sampler.sample(device_logits(be, np.tile(logits, (REPEAT, 1))),
                         sampler.history(histories * REPEAT), mask=mask, probs=True)
    support = want > 0
    for block in be.to_numpy(out.probs).reshape(REPEAT, rows, vocab):
        np.testing.assert_array_equal(block > 0, support)
        np.testing.assert_allclose(block, want, rtol=1e-5, atol=1e-7)
    tokens = np.array(out.tokens).reshape(REPEAT, rows)
    assert support[np.arange(rows), tokens].all()
    assert all(out.finite)


def _spread(rows: np.ndarray, ids: np.ndarray, vocab: int, fill: float) -> np.ndarray:
    wide = np.full((len(rows), vocab), fill, rows.dtype)
    wide[:, ids] = rows
    return wide
