"""Prompt lookup's drafts (speculative.LookupDraft): a copy with a token changed resumes right
after the changed token; otherwise the latest occurrence of the longest n-gram match."""

import numpy as np
import pytest

from diptych.inference.speculative import LookupDraft

# token ids of "self . items = {} def add ( self , name ) : self . items [ name ] += 1 ..."
SOURCE = [10, 11, 12, 13, 14, 20, 21, 22, 10, 23, 24, 25, 26, 10, 11, 12, 27, 24, 28, 29,
          30, 31, 10, 11, 12, 32, 33, 24, 34, 35, 36, 37]
RENAMED, OLD = 40, 12   # the copy renames "items"


def _copy_until(i: int) -> list[int]:
    """The source, then its copy with every OLD renamed, up to (not past) source token i."""
    return SOURCE + [RENAMED if t == OLD else t for t in SOURCE[:i]]


# after the first rename: by then the copy has gone on long enough to align with
@pytest.mark.parametrize("i", [i + 1 for i, t in enumerate(SOURCE) if t == OLD][1:])
def test_a_copy_resumes_after_the_changed_token(i):
    drafts, q = LookupDraft(3).propose(_copy_until(i), 6)
    assert q is None
    assert drafts == SOURCE[i:i + 6]


def test_an_ngram_match_alone_jumps_to_the_changed_tokens_latest_use():
    """What the alignment fixes: after the second renamed token, the latest earlier
    "self . RENAMED" is the copy's first, followed by "= {}", where the source goes on
    with "[ name ]"."""
    ids = np.asarray(_copy_until(16))
    lookup = LookupDraft(3)
    assert ids[lookup._ngram(ids)] == 13                 # "=", from the copy's first line
    assert ids[lookup._aligned(ids)] == SOURCE[16]       # "[", the source's own next token


def _latest_longest(ids: np.ndarray, ngram: int) -> int | None:
    """The n-gram rule written out: latest occurrence of the last n tokens, n = ngram..1."""
    for n in range(min(ngram, len(ids) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(1))
        if len(hits):
            return int(hits[-1]) + n
    return None


@pytest.mark.parametrize("ngram", [1, 2, 3, 5])
def test_ngram_fallback_is_the_latest_longest_match(ngram):
    rng = np.random.default_rng(ngram)
    for _ in range(500):
        ids = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 60)))
        assert LookupDraft(ngram)._ngram(ids) == _latest_longest(ids, ngram)


def test_nothing_to_copy_drafts_nothing():
    assert LookupDraft(3).propose(list(range(50)), 8) == ([], None)
    assert LookupDraft(3).propose([7], 8) == ([], None)


def test_of_two_equally_aligned_places_the_latest_is_copied():
    a = list(range(100, 116))
    drafts, _ = LookupDraft(3).propose(a + [1, 2, 3] + a + [4, 5, 6] + a, 3)
    assert drafts == [4, 5, 6]
