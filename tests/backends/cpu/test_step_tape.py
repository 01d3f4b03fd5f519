"""Decode and verification steps replayed from a tape of their kernel calls
(backends/torch/cpu/step_tape.py) against the same steps run through the graph: the same
logits bit for bit at every step, on tiny random models of every family (quantized, so that
the linears take the kernels), past the sliding window of the ring caches; the families
whose steps cannot be taped still decode, through the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diptych
from diptych.backends.torch.cpu import int8_activations, step_tape

from ...tiny_models import FAMILIES, tiny_hf_model, write_gguf

# the families whose whole decode step runs on kernels the tape records (expert routing
# and MLA's per-head products are torch ops: those steps run through the graph)
TAPED = {"llama", "qwen2", "mistral", "gemma3", "qwen3"}
NUMERICS = ["exact"] + (["fast"] if int8_activations.SUPPORTED else [])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tape")
    return {f: write_gguf(tiny_hf_model(f, seed=3), f, folder / f"{f}.gguf", "Q8_0")
            for f in FAMILIES}


def _decode(model, prompt, steps, taped):
    """Greedy decode after `prompt`, one eval per token: (tokens, logits per step)."""
    seq = model.engine.main
    model.engine.reset()
    compiled = seq._step
    if not taped:
        seq._step = seq._run  # the graph itself, every step
    try:
        seq.eval(prompt)
        tok, tokens, rows = prompt[-1], [], []
        for _ in range(steps):
            row = model.engine.backend.to_numpy(seq.eval([tok])).reshape(-1)
            tok = int(row.argmax())
            tokens.append(tok)
            rows.append(row)
    finally:
        seq._step = compiled
    return tokens, np.array(rows)


def _verify(model, prompt, widths, taped):
    """Steps of the given widths after `prompt` (as speculative verification runs them),
    over one stream of tokens (the same tokens whatever the widths): the logits of every
    position of each step, (1, width, vocab) arrays."""
    seq = model.engine.main
    model.engine.reset()
    compiled = seq._step
    if not taped:
        seq._step = seq._run
    tokens = [int(t) for t in np.random.default_rng(7).integers(3, 120, sum(widths))]
    try:
        seq.eval(prompt)
        ends = np.cumsum(widths)
        return [model.engine.backend.to_numpy(seq.step(tokens[end - w:end]))
                for w, end in zip(widths, ends)]
    finally:
        seq._step = compiled


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("family", FAMILIES)
def test_taped_steps_equal_the_graph(paths, family, numerics):
    model = diptych.load(paths[family], backend="torch", device="cpu", n_ctx=64,
                         numerics=numerics)
    prompt = [5, 17, 33, 9, 71]
    tokens, logits = _decode(model, prompt, 24, taped=True)  # 29 positions: rings wrap
    want_tokens, want = _decode(model, prompt, 24, taped=False)
    assert tokens == want_tokens
    assert np.array_equal(logits, want)
    tapes = model.engine.main._step._tapes
    assert [entry is not None for entry in tapes.values()] == [family in TAPED]
    widths = [3, 1, 3, 8, 3, 3]  # 21 positions after the prompt: rings wrap
    for got, want in zip(_verify(model, prompt, widths, True), _verify(model, prompt, widths, False)):
        assert np.array_equal(got, want)
    assert sum(entry is not None for entry in tapes.values()) == (3 if family in TAPED else 0)


def test_a_replayed_step_checks_its_token_and_returns_its_own_logits(paths):
    """The embedding's range check is part of the tape (a bad id fails the step and leaves
    the sequence usable), and each step's logits are its own array: the next replay does
    not overwrite them."""
    model = diptych.load(paths["llama"], backend="torch", device="cpu", n_ctx=64)
    seq = model.engine.main
    seq.eval([5, 6, 7])
    seq.eval([8])  # the step recorded
    first = seq.eval([9])  # replays from here on
    kept = first.clone()
    second = seq.eval([10])
    assert torch.equal(first, kept) and not torch.equal(first, second)
    n = seq.n_cached
    with pytest.raises(IndexError, match="out of range"):
        seq.eval([10_000])
    assert seq.n_cached == n
    tokens, _ = _decode(model, [5, 6, 7], 3, taped=True)
    assert tokens == _decode(model, [5, 6, 7], 3, taped=False)[0]


def test_an_op_outside_the_tape_leaves_the_step_to_the_graph():
    """A call reading an array no recorded call wrote (a torch op's fresh output) marks the
    tape incomplete; the step's own output must be a recorded buffer too."""
    x = np.ones(4, np.float32)
    tape = step_tape.Tape([x])
    y = np.empty(4, np.float32)
    tape.add(np.add, (x, x, y), reads=(x,), writes=(y,))
    tape.add(np.add, (y[1:], y[1:], y[1:]), reads=(y[1:],), writes=())  # a view: fine
    assert tape.complete and tape.owns(y[2:]) and not tape.owns(np.ones(4, np.float32))
    tape.add(np.add, (y, y, y), reads=(np.ones(4, np.float32),), writes=())
    assert not tape.complete


def test_replays_grow_the_rope_tables(paths):
    """A replayed step past the RoPE tables' length grows them, as the graph does (tables
    cut short here: they start at thousands of positions)."""
    model = diptych.load(paths["llama"], backend="torch", device="cpu", n_ctx=64)
    prompt = [5, 17, 33, 9, 71]
    want_tokens, want = _decode(model, prompt, 12, taped=True)
    be = model.engine.backend
    for spec, (cos, sin) in list(be._rope_cache.items()):
        be._rope_cache[spec] = (cos[:8].clone(), sin[:8].clone())
    be._np_rope.clear()
    tokens, logits = _decode(model, prompt, 12, taped=True)  # replays, positions 5 to 16
    assert tokens == want_tokens and np.array_equal(logits, want)


@pytest.mark.skipif(not int8_activations.SUPPORTED, reason="no int8 activations on this CPU")
# MoE routing and MLA run torch ops (an F32 router's product, per-head bmm) whose bits
# depend on the step's width: the families whose steps run on the kernels
@pytest.mark.parametrize("family", sorted(TAPED))
def test_int8_verify_steps_give_one_position_steps_bits(paths, family):
    """On the int8 path every op of a step computes each position as a one-position step
    does (the products' rows do not depend on the step's width, attention runs each query
    over its own keys, the row kernels take contiguous rows at every width): a verify step
    of the same tokens gives the same logits bit for bit, so speculative decoding there
    emits exactly what plain decoding does. 24 positions after the prompt: rings wrap."""
    model = diptych.load(paths[family], backend="torch", device="cpu", n_ctx=64,
                         numerics="fast")

    def rows(widths):
        return np.concatenate(_verify(model, [5, 17, 33, 9, 71], widths, True), axis=1)

    one = rows([1] * 24)
    for widths in ([2, 5, 8, 1, 3, 5], [9, 9, 6]):
        assert np.array_equal(rows(widths), one), widths
