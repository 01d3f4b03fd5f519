"""Checks of the runtime's sampler that every backend must pass, shared by
tests/runtime/test_sampler*.py (torch's CPU backend, MLX) and tests/backends/cuda (CUDA)."""

from __future__ import annotations

import numpy as np

from diptych.inference.sampler import Sampler
from diptych.inference.sampling import SamplingParams


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
    """NaN, +inf and -inf rows are flagged and still yield in-range tokens (the draw does not
    fail on them); the finite row is not flagged."""
    rows = np.tile(np.random.default_rng(0).standard_normal((1, 300)), (4, 1))
    rows[0, 3], rows[1, 5], rows[2, 7] = np.nan, np.inf, -np.inf
    for params in (SamplingParams(seed=0), SamplingParams(temperature=0),
                   SamplingParams(top_k=0, top_p=1.0, min_p=0.0, seed=0)):
        out = Sampler(be, params, 300).sample(device_logits(be, rows), probs=True, logprobs=2)
        assert out.finite == [False, False, False, True]
        assert all(0 <= t < 300 for t in out.tokens)
