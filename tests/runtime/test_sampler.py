"""The runtime's sampler on torch's CPU backend and MLX: blocks of rows with their own
histories, the history's step-by-step update, the order of the filters, logprobs, the
non-finite flag and the new parameters' validation."""

import numpy as np
import pytest

import diptych
from diptych.backends import select
from diptych.errors import NumericalError, SamplingError
from diptych.inference.sampler import Sampler, TokenHistory
from diptych.inference.sampling import SamplingParams

from ..sampler_checks import (check_block_rows_equal_single_rows,
                              check_non_finite_rows_are_flagged, device_logits)
from ..tiny_models import tiny_hf_model, write_gguf

VOCAB = 64


@pytest.fixture(params=["torch", "mlx"])
def be(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return select(request.param, "cpu")


def test_rows_of_a_block_equal_rows_one_by_one(be):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, VOCAB)) * 2
    likely = np.argsort(-logits, axis=-1)[:, :8]
    histories = [[], list(map(int, likely[1, :3])), list(map(int, likely[2, [0, 0, 1, 5]]))]
    check_block_rows_equal_single_rows(be, logits, histories, SamplingParams(
        temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
        frequency_penalty=0.2, presence_penalty=0.5))


def test_rows_with_few_distinct_ids_beside_rows_with_many(be):
    # the device sees each row's distinct ids in one (R, U) block: a row with fewer pads
    # its part, and an empty history penalises nothing (id 0, the padding's, is the best)
    logits = np.random.default_rng(6).standard_normal((3, VOCAB)) * 2
    logits[:, 0] = 4.0
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0,
                            repetition_penalty=1.5, presence_penalty=1.0)
    check_block_rows_equal_single_rows(be, logits, [[0, 0], [5, 0, 1, 2, 3], []], params)
    sampler = Sampler(be, params, VOCAB)
    alone = sampler.sample(device_logits(be, logits[2:]), sampler.history([[]]), probs=True)
    plain = Sampler(be, SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0), VOCAB)
    np.testing.assert_allclose(be.to_numpy(alone.probs),
                               be.to_numpy(plain.sample(device_logits(be, logits[2:]),
                                                        probs=True).probs), rtol=1e-6)


def test_non_finite_logits_are_flagged(be):
    check_non_finite_rows_are_flagged(be)


def test_history_updated_step_by_step_equals_history_built_at_once(be):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 6, 5)), []]
    history = TokenHistory(be, VOCAB, 8, prompts)
    steps = rng.integers(0, 6, (12, 2))
    for step in steps:
        history.append([int(t) for t in step])
    rows = [p + [int(t) for t in steps[:, r]] for r, p in enumerate(prompts)]
    want = np.stack([np.bincount(row[-8:], minlength=VOCAB) for row in rows])
    np.testing.assert_array_equal(dense_counts(be, history), want)
    np.testing.assert_array_equal(dense_counts(be, TokenHistory(be, VOCAB, 8, rows)), want)
    assert dense_counts(be, TokenHistory(be, VOCAB, 8, [rows[0]]), rows=3).tolist() == [
        want[0].tolist()] * 3


def dense_counts(be, history, rows=None):
    """What the history hands the device (its distinct ids and their counts) as (R, VOCAB)."""
    idx, counts = (be.to_numpy(a) for a in history.seen(rows or history.rows)[:2])
    dense = np.zeros((len(idx), VOCAB))
    for r, (ids, num) in enumerate(zip(idx.astype(np.int64), counts)):
        dense[r, ids] = num
    return dense


def filtered(be, probs, **params):
    """The distribution the sampler draws from, for one row of probabilities."""
    sampler = Sampler(be, SamplingParams(seed=0, **params), len(probs))
    out = sampler.sample(device_logits(be, np.log(np.array([probs]))), probs=True)
    return be.to_numpy(out.probs)[0]


def test_top_p_sees_the_untempered_distribution(be):
    # top_p 0.7 on (.5, .3, .15, .05) keeps two tokens; tempered first (t = 0.25, p ~ p^4)
    # it would keep only the first. The second is then drawn with probability .3^4 / (.5^4 +
    # .3^4) = 0.115.
    got = filtered(be, [.5, .3, .15, .05], temperature=0.25, top_k=0, top_p=0.7, min_p=0.0)
    np.testing.assert_allclose(got, [.5**4, .3**4, 0, 0] / np.float64(.5**4 + .3**4),
                               rtol=1e-5)


def test_min_p_is_relative_to_the_best_token(be):
    # min_p 0.3 of the best (.4) is .12: .2 stays, .1 goes
    got = filtered(be, [.4, .3, .2, .1], temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)
    np.testing.assert_allclose(got, [4 / 9, 3 / 9, 2 / 9, 0], rtol=1e-5)


def test_logprobs_of_the_chosen_and_top_tokens(be):
    rows = np.random.default_rng(5).standard_normal((3, 50)).astype(np.float32)
    sampler = Sampler(be, SamplingParams(seed=1, logit_bias={4: 5.0}), 50)
    out = sampler.sample(device_logits(be, rows), logprobs=3)
    ref = rows - np.log(np.exp(rows.astype(np.float64)).sum(-1, keepdims=True))
    # the model's own log-probabilities: logit_bias and the filters do not change them
    np.testing.assert_allclose(out.logprob, ref[np.arange(3), out.tokens], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-rows, axis=-1)[:, :3])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, axis=-1)[:, ::-1][:, :3],
                               atol=1e-5)
    with pytest.raises(SamplingError, match="logprobs"):
        sampler.sample(device_logits(be, rows), logprobs=51)


@pytest.mark.parametrize("kwargs,name", [
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {True: 1.0}}, "logit_bias"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"logit_bias": {3: "up"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": 5}, "logit_bias"),
])
def test_new_parameters_are_validated(kwargs, name):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**kwargs)


def test_logit_bias_and_histories_are_checked():
    params = SamplingParams(logit_bias={9: -float("inf"), 2: 1})
    assert params.logit_bias == ((2, 1.0), (9, -float("inf")))
    be = select("torch", "cpu")
    with pytest.raises(SamplingError, match="token 9, outside the vocabulary"):
        Sampler(be, params, 9)
    penalized = Sampler(be, SamplingParams(repetition_penalty=1.1), 9)
    with pytest.raises(SamplingError, match="history"):
        penalized.sample(be.zeros((1, 9)))
    with pytest.raises(SamplingError, match="2 rows for 3 rows"):
        penalized.sample(be.zeros((3, 9)), penalized.history([[1], [2]]))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        penalized.history([[1]]).append([9])


def test_generation_stops_with_a_clear_error_on_non_finite_logits(tmp_path):
    hf = tiny_hf_model("llama", seed=2)
    # a NaN inside a matrix (norm vectors are refused at load): every later logit is NaN
    hf.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    model = diptych.load(write_gguf(hf, "llama", tmp_path / "m.gguf"), backend="torch",
                         device="cpu", n_ctx=32)
    with pytest.raises(NumericalError, match="NaN or infinite"):
        list(model.stream([1, 2, 3], max_tokens=4, temperature=0))
