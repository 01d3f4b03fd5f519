"""A SentencePiece vocabulary's merges, as `tokenizers`' BPE model needs them.

llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose merged
token has the best score. `tokenizers` expresses the same rule as a ranked list of merges:
every split of every token into two vocabulary tokens, ordered by the merged token's score.
Deriving that list is most of the time it takes to load a large vocabulary (Gemma 3: 262k
tokens, 515k merges), so it is kept in the cache folder as token ids, keyed by a hash of the
tokens and scores it was derived from; a missing, unreadable or inconsistent file is derived
again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diptych.paths import write_cached

VERSION = 1            # of the derivation: a change to it must not read older files
CACHE_MIN_TOKENS = 32768   # smaller vocabularies derive faster than a file is found and read


def spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """The merges of the vocabulary `tokens` (strings) with `scores` (float32, one each), best
    first, from the cache folder when a previous load derived them."""
    path = _cache_path(tokens, scores) if len(tokens) >= CACHE_MIN_TOKENS else None
    ids = _read(path, len(tokens)) if path is not None else None
    if ids is None:
        ids = derive_merge_ids(tokens, scores)
        if path is not None:
            _write(path, ids)
    table = np.array(tokens, dtype=object)   # numpy's fancy index picks the strings in C
    return list(zip(*table[ids].T.tolist()))


def _cache_path(tokens: list[str], scores: np.ndarray) -> Path:
    from diptych.paths import cache_dir

    h = hashlib.sha256(f"{VERSION} {len(tokens)}\0".encode())
    h.update("\0".join(tokens).encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(scores, dtype=np.float32).tobytes())
    return cache_dir() / "tokenizers" / f"spm-merges-{h.hexdigest()[:32]}.npy"


def _read(path: Path, n_tokens: int) -> np.ndarray | None:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if (ids.dtype.kind != "i" or ids.ndim != 2 or ids.shape[1] != 2
            or (ids.size and (ids.min() < 0 or ids.max() >= n_tokens))):
        return None
    return ids


def _write(path: Path, ids: np.ndarray) -> None:
    """Written whole or not at all (a temporary file renamed); a read-only cache is fine."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, ids.astype(np.int32))

    write_cached(path, save)


def derive_merge_ids(tokens: list[str], scores: np.ndarray) -> np.ndarray:
    """(left id, right id) of every split of every token into two vocabulary tokens, best
    merged-token score first (ties: lower id first): llama.cpp's SentencePiece merge order.

    Slicing and hashing a large vocabulary's millions of substrings in Python is slow, so
    the substrings are found with a polynomial hash computed in numpy (uint64 arithmetic wraps
    mod 2**64): with Q[i] = sum_{j<i} c_j B^j over all tokens' code points concatenated, the
    substring [a, b) hashes to (Q[b] - Q[a]) * B^-a (B odd, so invertible mod 2**64). Each
    split's halves are looked up among the whole tokens' hashes; a hit must also have the right
    length, and every pair found is checked against the token's text."""
    n = len(tokens)
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    if n == 0 or lengths.max(initial=0) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    cps = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    total = len(cps)
    base = np.uint64(0x9E3779B97F4A7C15)           # odd
    inv = np.uint64(pow(int(base), -1, 1 << 64))
    with np.errstate(over="ignore"):
        powers = np.empty(total + 1, dtype=np.uint64)
        powers[0] = 1
        np.cumprod(np.full(total, base, dtype=np.uint64), out=powers[1:])
        inv_powers = np.empty(total + 1, dtype=np.uint64)
        inv_powers[0] = 1
        np.cumprod(np.full(total, inv, dtype=np.uint64), out=inv_powers[1:])
        q = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum((cps + np.uint64(1)) * powers[:-1], out=q[1:])

        def span_hash(a, b):
            return (q[b] - q[a]) * inv_powers[a]

        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        ends = starts + lengths
        full = span_hash(starts, ends)
        table = _HashIndex(full)

        def lookup(h, want_len):
            ids = table.find(h)
            ok = ids >= 0
            ok[ok] = lengths[ids[ok]] == want_len[ok]
            return np.where(ok, ids, -1)

        multi = np.nonzero(lengths >= 2)[0]
        splits = lengths[multi] - 1                  # split points per token
        owner = np.repeat(multi, splits)
        # k = 1..L-1 for each owner
        first = np.cumsum(splits) - splits
        k = np.arange(len(owner), dtype=np.int64) - np.repeat(first, splits) + 1
        mid = starts[owner] + k
        left = lookup(span_hash(starts[owner], mid), k)
        keep = left >= 0
        owner, k, mid, left = owner[keep], k[keep], mid[keep], left[keep]
        right = lookup(span_hash(mid, ends[owner]), lengths[owner] - k)
        keep = right >= 0
        owner, left, right = owner[keep], left[keep], right[keep]
    rank = np.lexsort((owner, -scores[owner].astype(np.float64)))
    left, right, owner = left[rank], right[rank], owner[rank]
    pick = tokens.__getitem__
    joined = map(str.__add__, map(pick, left.tolist()), map(pick, right.tolist()))
    ok = np.fromiter(map(str.__eq__, joined, map(pick, owner.tolist())), dtype=bool,
                     count=len(owner))
    if not ok.all():  # a hash collision
        left, right = left[ok], right[ok]
    return np.stack([left, right], axis=1)


class _HashIndex:
    """uint64 key -> row index, an open-addressing (linear probing) table held in numpy arrays,
    so that a million lookups cost a few vectorized gathers instead of a million dict calls
    (or binary searches)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        bits = max(4, int(len(keys) * 4).bit_length())        # load factor <= 1/4
        self.mask = (1 << bits) - 1
        self.shift = np.uint64(64 - bits)
        self.slots = np.full(self.mask + 1, -1, dtype=np.int64)
        pending = np.arange(len(keys), dtype=np.int64)
        pos = self._home(keys)
        while pending.size:
            p = pos[pending]
            free = self.slots[p] < 0
            cand = pending[free]
            self.slots[p[free]] = cand                           # last writer wins a slot
            lost = self.slots[pos[cand]] != cand
            pending = np.concatenate([pending[~free], cand[lost]])
            pos[pending] = (pos[pending] + 1) & self.mask

    def _home(self, h: np.ndarray) -> np.ndarray:
        # splitmix64's finalizer, then the top bits: short strings hash to small numbers
        with np.errstate(over="ignore"):
            x = h ^ (h >> np.uint64(30))
            x = x * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x = x * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        return (x >> self.shift).astype(np.int64)

    def find(self, h: np.ndarray) -> np.ndarray:
        out = np.full(len(h), -1, dtype=np.int64)
        pos = self._home(h)
        active = np.arange(len(h), dtype=np.int64)
        while active.size:
            slot = self.slots[pos[active]]
            filled = slot >= 0
            hit = filled.copy()
            hit[filled] = self.keys[slot[filled]] == h[active[filled]]
            out[active[hit]] = slot[hit]
            active = active[filled & ~hit]
            pos[active] = (pos[active] + 1) & self.mask
        return out
