"""The CPU backend's top-k over wide rows (chunked_topk.py) against torch.topk, and which
calls take it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diptych.backends import select
from diptych.backends.torch.cpu import chunked_topk


@pytest.fixture(scope="module")
def be():
    return select("torch", "cpu")


def _logits(rows, width, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, width),
                                                                        np.float32) * 3)


@pytest.mark.parametrize("width", [262144, 151936, 49152 + 77])
@pytest.mark.parametrize("rows", [1, 5])
def test_equals_torch_topk(be, width, rows):
    x = _logits(rows, width)
    for k in (1, 2, 40, width // (chunked_topk.CHUNK * chunked_topk.MIN_CHUNKS_PER_PICK)):
        assert chunked_topk.takes(width, k)
        want = torch.topk(x, k)
        for values, ids in (chunked_topk.topk(x, k), be.topk(x, k)):
            torch.testing.assert_close(values, want.values, rtol=0, atol=0)
            torch.testing.assert_close(ids, want.indices, rtol=0, atol=0)


def test_the_best_one_is_the_first_of_equals_or_a_nan(be):
    # k = 1 (greedy) is numpy's argmax on the CPU backend: torch.topk's choices
    x = _logits(3, 49152 + 5)
    x[0, [9, 30000, 49155]] = 50.0
    x[1, 77] = torch.nan
    x[2, -1] = 50.0
    strided = torch.empty(x.shape[::-1]).t()
    strided.copy_(x)   # the same values, not contiguous: torch's own reduction
    for y in (x, strided):
        values, ids = be.topk(y, 1)
        assert ids.ravel().tolist() == [9, 77, 49156] == torch.topk(y, 1).indices.ravel().tolist()
        assert values.shape == (3, 1) and torch.isnan(values[1, 0])
        assert values[[0, 2], 0].tolist() == [50.0, 50.0]


def test_the_best_values_crowded_in_one_chunk_and_in_the_tail(be):
    # the 40 best of a row sit in one chunk and in the tail past the last whole chunk: a
    # chunk's maximum stands for one value only, and the tail has no chunk of its own
    x = _logits(2, 151936 + 100, seed=1)
    x[0, 1280:1280 + chunked_topk.CHUNK] += 100
    x[1, -100:] += 100
    x[1, 5000:5010] += 50
    values, ids = be.topk(x, 40)
    want = torch.topk(x, 40)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)


def test_masked_rows_and_equal_values(be):
    # a grammar allows three tokens: the other 37 of the 40 are -inf, the lowest ids first
    x = torch.full((2, 262144), -torch.inf)
    allowed = [7, 70000, 262143]
    x[0, allowed] = torch.tensor([1.0, 3.0, 2.0])
    x[1] = _logits(1, 262144, seed=2)[0]
    x[1, [90000, 5, 200000, 131]] = 30.0                   # a four-way tie at the top
    values, ids = be.topk(x, 40)
    assert ids[0].tolist() == [70000, 262143, 7] + [i for i in range(38) if i != 7][:37]
    assert torch.isneginf(values[0, 3:]).all()
    assert ids[1, :4].tolist() == [5, 131, 90000, 200000]
    want = torch.topk(x[1:], 40)
    assert torch.equal(values[1:], want.values)
    assert sorted(ids[1, :4].tolist()) == sorted(want.indices[0, :4].tolist())
    assert torch.equal(ids[1, 4:], want.indices[0, 4:])


def test_a_row_with_nan_takes_torch_topk(be):
    x = _logits(2, 262144)
    x[1, 99] = torch.nan
    put = (torch.tensor([[3], [4]]), torch.tensor([[0.5], [0.5]]))
    for (values, ids), row0 in ((be.topk(x, 40), x[0]),
                                (be.scatter_topk(x, *put, 40), x.scatter(-1, *put)[0])):
        assert ids[1, 0] == 99 and torch.isnan(values[1, 0])
        assert torch.equal(ids[0], torch.topk(row0, 40).indices)
    y = _logits(1, 262144)
    values, ids = be.scatter_topk(y, torch.tensor([[11]]), torch.tensor([[torch.nan]]), 40)
    assert ids[0, 0] == 11 and torch.isnan(values[0, 0])      # a NaN put in place


@pytest.mark.parametrize("width", [262144, 151936 + 77])
@pytest.mark.parametrize("k", [1, 40, 64])
def test_values_put_in_place_equal_torch_topk_of_the_scattered_row(be, width, k):
    # the penalties' case: some of each row's best lowered (out of the top-k or not), some
    # low values raised into it, ids in the short last chunk, and a row's ids padded by
    # repeating its last one (TokenHistory.seen)
    x = _logits(3, width, seed=k)
    rng = np.random.default_rng(k)
    top = torch.topk(x, 8).indices
    idx = torch.stack([top[0], torch.from_numpy(rng.integers(0, width, 8)),
                       torch.arange(width - 8, width)])
    idx = torch.cat([idx, torch.from_numpy(rng.integers(0, width, (3, 56)))], 1)
    idx = torch.cat([idx, idx[:, -1:].expand(3, 8)], 1)
    put = torch.gather(x, 1, idx) / 1.1 - 5.0
    put[1, :8] = 20.0 + torch.arange(8.0)                  # raised past every other value
    put[:, -8:] = put[:, -9:-8]                            # the padding's values repeat too
    want = torch.topk(x.scatter(-1, idx, put), k)
    values, ids = be.scatter_topk(x, idx, put, k)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
    values, ids = chunked_topk.topk(x, k, idx, put)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
    assert torch.equal(x, _logits(3, width, seed=k))      # the row itself is not written


def test_narrow_rows_and_large_k_take_torch_topk():
    assert not chunked_topk.takes(49152, 97)
    assert not chunked_topk.takes(512, 1)
    assert chunked_topk.takes(151936, 40) and chunked_topk.takes(262144, 512)


def test_ids_outside_the_row_are_refused(be):
    x = _logits(1, 262144)
    for bad in (262144, -1):
        with pytest.raises((IndexError, RuntimeError)):
            be.scatter_topk(x, torch.tensor([[5, bad]]), torch.tensor([[1.0, 2.0]]), 40)
    with pytest.raises(ValueError, match="for 1 rows"):
        chunked_topk.topk(x, 40, torch.tensor([[5], [6]]), torch.tensor([[1.0], [2.0]]))

