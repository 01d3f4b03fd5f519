"""Sampling settings, and the sampler's filters on each backend (torch, and mlx where
installed)."""

import numpy as np
import pytest

from diptych.backends import select
from diptych.errors import DiptychError, ModelFileError, SamplingError
from diptych.inference.sampler import Sampler
from diptych.inference.sampling import SamplingParams, model_sampling


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": "hot"},
    {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 1.0}, {"min_p": -0.1}, {"top_k": -1},
    {"top_k": 2.5}, {"repetition_penalty": 0.0}, {"seed": -1}, {"seed": 1.5},
    {"penalty_last_n": -3}, {"top_k": True},
])
def test_invalid_parameters_raise_one_clear_error(kwargs):
    with pytest.raises(SamplingError) as exc:
        SamplingParams(**kwargs)
    assert isinstance(exc.value, DiptychError)
    assert next(iter(kwargs)) in str(exc.value)


def test_model_defaults_come_from_the_file_then_explicit_values_override():
    # gguf-py's key names (Keys.General.SAMPLING_*), the values llama.cpp applies
    meta = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20,
            "general.sampling.top_p": 0.8, "general.sampling.min_p": 0.0,
            "general.sampling.penalty_repeat": 1.05, "general.sampling.penalty_last_n": 32}
    params = model_sampling(meta)
    assert (params.temperature, params.top_k, params.top_p, params.min_p,
            params.repetition_penalty, params.penalty_last_n) == (0.6, 20, 0.8, 0.0, 1.05, 32)
    assert model_sampling({}) == SamplingParams()
    over = params.with_overrides(temperature=0.0, top_k=None, seed=3)
    assert (over.temperature, over.top_k, over.seed) == (0.0, 20, 3)
    with pytest.raises(SamplingError, match="tempreature"):
        params.with_overrides(tempreature=0.1)


def test_smollm2_gets_our_default_unless_its_file_says_otherwise():
    meta = {"general.organization": "HuggingFaceTB", "general.basename": "smollm2"}
    assert model_sampling(meta).temperature == 0.0
    assert model_sampling({**meta, "general.sampling.temp": 0.7}).temperature == 0.7


@pytest.mark.parametrize("key,value", [("general.sampling.temp", -1.0),
                                       ("general.sampling.top_p", "high"),
                                       ("general.sampling.top_k", float("nan"))])
def test_bad_sampling_metadata_names_the_key(key, value):
    with pytest.raises(ModelFileError, match=key):
        model_sampling({key: value})


@pytest.fixture(params=["torch", "mlx"])
def draw(request):
    """draw(logits, n, history, seed, **params) -> counts per token on one backend (n rows
    of the same logits sampled as one block)."""
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    be = select(request.param)

    def run(logits, n=2000, history=(), seed=0, **kw):
        sampler = Sampler(be, SamplingParams(seed=seed, **kw), len(logits))
        x = be.prepare_vector(np.tile(np.asarray(logits, np.float32), n)).reshape(n, -1)
        drawn = sampler.sample(x, sampler.history([list(history)]))
        return np.bincount(drawn.tokens, minlength=len(logits))

    run.backend = be
    return run


def test_greedy_is_argmax(draw):
    assert draw([0.1, 3.0, 2.9, -1.0], n=5, temperature=0)[1] == 5


def test_top_k_keeps_only_k_tokens(draw):
    counts = draw([1.0, 0.9, 0.8, 0.7, 0.6], temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_top_p_cuts_the_tail(draw):
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.05


def test_top_p_looks_at_the_distribution_before_temperature(draw):
    # llama.cpp's order: top_p=0.7 on 0.5, 0.3, 0.15, 0.05 keeps two tokens, then
    # temperature 0.25 sharpens them to 0.885, 0.115. Applied after temperature (0.879,
    # 0.114, ...), top-p would keep the first token alone.
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    counts = draw(list(logits), temperature=0.25, top_k=0, top_p=0.7, min_p=0.0)
    assert counts[2:].sum() == 0
    assert abs(counts[1] / counts.sum() - 0.3**4 / (0.5**4 + 0.3**4)) < 0.03


def test_top_k_then_top_p_sees_the_renormalised_top_k(draw):
    # top-k=2 leaves (0.4, 0.35) -> renormalised 0.533, 0.467: top_p=0.5 keeps only the first
    logits = np.log([0.4, 0.35, 0.25])
    counts = draw(list(logits), n=300, temperature=1.0, top_k=2, top_p=0.5, min_p=0.0)
    assert counts[0] == 300


def test_min_p_drops_tokens_below_fraction_of_the_best(draw):
    logits = np.log([0.6, 0.3, 0.05, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert counts[2:].sum() == 0


def test_min_p_is_relative_to_the_best_probability(draw):
    # min_p=0.3 of the best 0.4 is 0.12: 0.2 stays, 0.1 goes (an absolute 0.3 would drop both)
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)
    assert counts[3] == 0
    assert abs(counts[2] / counts.sum() - 0.2 / 0.9) < 0.03


def test_temperature_sharpens_and_flattens(draw):
    logits = [1.0, 0.0]
    cold = draw(logits, temperature=0.25, top_k=0, top_p=1.0, min_p=0.0)
    hot = draw(logits, temperature=4.0, top_k=0, top_p=1.0, min_p=0.0)
    assert cold[0] / cold.sum() > 0.95 and 0.5 < hot[0] / hot.sum() < 0.65


def test_sampled_frequencies_follow_the_distribution(draw):
    p = np.array([0.5, 0.25, 0.125, 0.125])
    counts = draw(list(np.log(p)), n=4000, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert np.abs(counts / counts.sum() - p).max() < 0.03


def test_repetition_penalty_demotes_seen_tokens(draw):
    logits = [2.0, 1.9, -1.0]
    assert draw(logits, n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1
    # negative logits are multiplied, so they move further down
    assert draw([-1.0, -1.2], n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1
    # a repeated id is penalised once, and only the last penalty_last_n ids count
    assert draw([2.0, 1.5], n=1, history=[0, 0, 0], temperature=0,
                repetition_penalty=1.2)[0] == 1
    assert draw(logits, n=1, history=[0, 2, 2], temperature=0, repetition_penalty=1.5,
                penalty_last_n=2)[0] == 1


def test_presence_penalty_subtracts(draw):
    assert draw([2.0, 1.5], n=1, history=[0], temperature=0, presence_penalty=1.0)[1] == 1


def test_seed_reproduces_and_differs(draw):
    be = draw.backend
    x = be.prepare_vector(np.random.default_rng(1).standard_normal(1000)).reshape(1, -1)
    runs = []
    for seed in (7, 7, 8):
        sampler = Sampler(be, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                             seed=seed), 1000)
        runs.append([sampler.sample(x).tokens[0] for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1 and runs[0] != runs[2]
