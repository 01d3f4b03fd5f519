"""Sampling settings and the torch sampler's filters."""

import numpy as np
import pytest
import torch

from diptych.backends.torch.sampler import sample
from diptych.errors import DiptychError, SamplingError
from diptych.sampling import SamplingParams


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


def draw(logits, n=2000, history=(), **kw):
    params = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([logits], dtype=torch.float32)
    hist = torch.tensor(history, dtype=torch.int64)
    return np.bincount([sample(x, params, hist, gen) for _ in range(n)], minlength=len(logits))


def test_greedy_is_argmax():
    assert draw([0.1, 3.0, 2.9, -1.0], n=5, temperature=0)[1] == 5


def test_top_k_keeps_only_k_tokens():
    counts = draw([1.0, 0.9, 0.8, 0.7, 0.6], temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_top_p_cuts_the_tail():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.05


def test_min_p_drops_tokens_below_fraction_of_the_best():
    logits = np.log([0.6, 0.3, 0.05, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert counts[2:].sum() == 0


def test_temperature_sharpens_and_flattens():
    logits = [1.0, 0.0]
    cold = draw(logits, temperature=0.25, top_k=0, top_p=1.0, min_p=0.0)
    hot = draw(logits, temperature=4.0, top_k=0, top_p=1.0, min_p=0.0)
    assert cold[0] / cold.sum() > 0.95 and 0.5 < hot[0] / hot.sum() < 0.65


def test_repetition_penalty_demotes_seen_tokens():
    logits = [2.0, 1.9, -1.0]
    assert draw(logits, n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1
    # negative logits are multiplied, so they move further down
    assert draw([-1.0, -1.2], n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1


def test_seed_reproduces():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    x = torch.randn(1, 1000)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(params.seed)
        runs.append([sample(x, params, torch.empty(0, dtype=torch.int64), gen) for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
