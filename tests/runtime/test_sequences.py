"""Rollback and independent sequences, on every backend (torch on the CPU, the CUDA backend
under the Triton interpreter, MLX) and every cache kind (full, wrapped ring, MLA), against a
fresh forward of the same ids."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before the Triton kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diptych.errors import InvalidArgumentError, OutOfMemoryError
from diptych.inference.engine import Engine
from diptych.load_plan import LoadPlan

from .test_graph_oracle import IDS, tiny  # noqa: F401 (a fixture)

JUNK = [int(i) for i in np.random.default_rng(3).integers(3, 128, 17)]


@pytest.fixture(params=["torch", "cuda", "mlx"])
def backend(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
        from diptych.backends.mlx.backend import MLXBackend

        return MLXBackend("cpu")
    if request.param == "cuda":
        pytest.importorskip("triton")
        from diptych.backends.torch.cuda.backend import CudaBackend

        return CudaBackend("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    from diptych.backends.torch.cpu.backend import CpuBackend

    return CpuBackend()


def _engine(path, backend, max_rollback=0) -> Engine:
    return LoadPlan.open(path, backend, n_ctx=64, n_batch=4, max_rollback=max_rollback).engine()


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "mistral", "deepseek_v2"])
def test_rollback_then_decode_equals_a_fresh_forward(tiny, backend, family):
    """A draft of n tokens (chunks of 4 and single steps) written and rolled back, for n up
    to 17 (more than the 4-token chunk: the ring's rollback slots), on a ring of
    8 - 1 + 4 + 17 = 28 slots that wraps; then one token, and a step of width 2."""
    _, path, ref = tiny(family)
    eng = _engine(path, backend, max_rollback=17)
    if family == "mistral":
        assert max(s.slots for s in eng.main.cache.specs if s.window) == 28
    eng.eval(IDS[:28])
    at = 28
    for n in (1, 2, 5, 17):
        eng.eval(JUNK[:n])
        eng.rollback(n)
        got = [backend.to_numpy(eng.eval([IDS[at]]))[0]]
        got += list(backend.to_numpy(eng.step(IDS[at + 1:at + 3]))[0])
        assert _rel(np.stack(got), ref[at:at + 3]) <= 1e-4, n
        at += 3
    assert eng.tokens == IDS[:at]
    with pytest.raises(InvalidArgumentError, match="allocated for rollbacks of up to 17"):
        eng.rollback(18)


@pytest.mark.parametrize("family", ["mistral", "deepseek_v2"])
def test_interleaved_sequences_each_give_what_they_give_alone(tiny, backend, family):
    """Two sequences with their own caches, stepped alternately, past the ring's wrap: each
    gets exactly the logits it gets alone; a third does not fit the budget of two."""
    _, path, _ = tiny(family)
    a_ids, b_ids = IDS[:20], IDS[20:40]
    alone = []
    for ids in (a_ids, b_ids):
        eng = _engine(path, backend)
        alone.append([backend.to_numpy(eng.prefill(ids[:6]))]
                     + [backend.to_numpy(eng.step([t])[0]) for t in ids[6:]])
    eng = _engine(path, backend)
    eng.cache_budget = 2 * eng.sequence_bytes
    a, b = eng.main, eng.open_sequence()
    with pytest.raises(OutOfMemoryError, match="cache budget"):
        eng.open_sequence()
    got = [[backend.to_numpy(a.prefill(a_ids[:6]))], [backend.to_numpy(b.prefill(b_ids[:6]))]]
    for ta, tb in zip(a_ids[6:], b_ids[6:]):
        got[0].append(backend.to_numpy(a.step([ta])[0]))
        got[1].append(backend.to_numpy(b.step([tb])[0]))
    for g, want in zip(got, alone):
        np.testing.assert_array_equal(np.concatenate(g), np.concatenate(want))
    assert a.tokens == a_ids and b.tokens == b_ids
