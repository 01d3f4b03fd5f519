"""SentencePiece merges (diptych.text.spm_merges): derived in llama.cpp's order, kept in the
cache folder by a hash of the tokens and scores, and derived again whenever the file there
cannot be trusted. (The real Gemma 3 vocabulary's tokenization against llama.cpp's is in
test_tokenizer.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from diptych.text import spm_merges as sm

TOKENS = ["a", "b", "c", "ab", "bc", "abc", "ca", "cab", "bca"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path))
    monkeypatch.setattr(sm, "CACHE_MIN_TOKENS", 0)
    return tmp_path / "tokenizers"


def expected(tokens, scores):
    """Every split of every token into two tokens, by the merged token's score (ties: id)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = [(-float(scores[ids[t]]), ids[t], t[:k], t[k:]) for t in tokens
             for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    return [(left, right) for _, _, left, right in sorted(found)]


def test_merges_follow_the_merged_tokens_scores(cache):
    scores = np.array([0, 0, 0, -3, -1, -2, -5, -4, -0.5], np.float32)
    merges = sm.spm_merges(TOKENS, scores)
    assert merges == expected(TOKENS, scores)
    assert merges[:2] == [("b", "ca"), ("bc", "a")]   # bca scores best; then bc


def test_a_second_load_reads_the_cache_and_other_scores_do_not(cache, monkeypatch):
    scores = np.linspace(0, -8, len(TOKENS)).astype(np.float32)
    first = sm.spm_merges(TOKENS, scores)
    assert len(list(cache.glob("*.npy"))) == 1

    def fail(*args):
        raise AssertionError("derived again")

    monkeypatch.setattr(sm, "derive_merge_ids", fail)
    assert sm.spm_merges(TOKENS, scores) == first
    with pytest.raises(AssertionError, match="derived again"):
        sm.spm_merges(TOKENS, scores[::-1].copy())


@pytest.mark.parametrize("damage", ["truncated", "out of range", "not ids"])
def test_an_untrustworthy_cache_file_is_derived_again(cache, damage):
    scores = np.linspace(0, -8, len(TOKENS)).astype(np.float32)
    good = sm.spm_merges(TOKENS, scores)
    (path,) = cache.glob("*.npy")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "out of range":
        np.save(path, np.array([[0, len(TOKENS)]], np.int32))
    else:
        np.save(path, np.zeros((3, 3), np.float32))
    assert sm.spm_merges(TOKENS, scores) == good
    assert np.array_equal(np.load(path), sm.derive_merge_ids(TOKENS, scores))


def test_a_small_vocabulary_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path))
    sm.spm_merges(TOKENS, np.zeros(len(TOKENS), np.float32))
    assert not (tmp_path / "tokenizers").exists()
