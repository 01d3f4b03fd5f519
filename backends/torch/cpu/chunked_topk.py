"""The k best logits of a wide row on the CPU: one pass of torch, then one numba kernel.

torch.topk over a 150k-260k vocabulary runs a selection over the whole row, which was most
of a sampling step. Instead the row is cut into chunks of `CHUNK` values: one pass takes
each chunk's maximum, the chunks whose maxima are among the k largest hold the k best
values (any value outside them has k chunk maxima at least as large), and a selection
among those chunks' values gives the k best. A row whose length is not a multiple of CHUNK
has a shorter last chunk.

`topk(x, k, idx, values)` is the top-k of `x` with `values` put at `idx` (the sampler's
penalised logits) without writing that row: the chunks holding a replaced value are read
with it. The results equal torch.topk's of the scattered row; among equal values the lower
id comes first. A row holding a NaN (which torch.topk puts first) takes torch's path.
"""

from __future__ import annotations

import numpy as np
import torch

from .cached_njit import cached_njit
from .kernel_cache import call_announced

CHUNK = 128
# one torch.topk is as fast below this many values, or below this many chunks per value kept
MIN_WIDTH = 16384
MIN_CHUNKS_PER_PICK = 4


def takes(width: int, k: int) -> bool:
    """Whether `topk` of k among `width` values goes through the chunks."""
    return width >= MIN_WIDTH and k * CHUNK * MIN_CHUNKS_PER_PICK <= width


def topk(x: torch.Tensor, k: int, idx: torch.Tensor | None = None,
         values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest values of each row of a 2-d float32 x (with
    `values` (R, U) put at `idx` (R, U) first, when given), largest first."""
    rows, width = x.shape
    n = width // CHUNK
    # the pass over the whole row: torch's vectorised reduction (NaN propagates into it)
    maxima = x[:, :n * CHUNK].view(rows, n, CHUNK).amax(-1).numpy()
    a = x.numpy()
    if idx is None:
        at, put = np.zeros((rows, 0), np.int64), np.zeros((rows, 0), np.float32)
    else:   # C-contiguous: one compiled version of the kernel
        at = np.ascontiguousarray(idx.numpy(), np.int64)
        put = np.ascontiguousarray(values.numpy(), np.float32)
        if at.ndim != 2 or at.shape[0] != rows or put.shape != at.shape:
            raise ValueError(f"ids {tuple(at.shape)} and values {tuple(put.shape)} for "
                             f"{rows} rows")
    out_v, out_i = np.empty((rows, k), np.float32), np.empty((rows, k), np.int64)
    if not call_announced(_topk_rows, (a, maxima, at, put, k, out_v, out_i),
                          "sampler's top-k kernel"):  # NaN (torch orders it), or a bad id
        return torch.topk(x if idx is None else x.scatter(-1, idx, values), k)
    return torch.from_numpy(out_v), torch.from_numpy(out_i)


@cached_njit(error_model="numpy")
def _topk_rows(x, whole, idx, put, k, out_v, out_i):
    """out_v, out_i = the k best of each row of x with put[r] at idx[r], largest first (the
    lower id first among equals), given the maxima of its whole chunks as they are in x;
    False, with the outputs unfinished, if a row holds NaN or an id is out of range."""
    rows, width = x.shape
    n = (width + CHUNK - 1) // CHUNK
    maxima = np.empty(n, np.float32)
    chunks = np.empty(n, np.int64)
    for r in range(rows):
        order = np.argsort(idx[r])
        at, val = idx[r][order], put[r][order]
        if at.size and (at[0] < 0 or at[-1] >= width):
            return False   # torch's scatter says what is wrong
        # 1. each chunk's maximum: read again where a value is replaced, and for the tail
        maxima[:whole.shape[1]] = whole[r]
        if n > whole.shape[1]:
            maxima[n - 1] = _chunk_max(x[r], n - 1, at, val)
        p = 0
        while p < at.size:
            c = at[p] // CHUNK
            maxima[c] = _chunk_max(x[r], c, at, val)
            while p < at.size and at[p] // CHUNK == c:
                p += 1
        for c in range(n):
            if maxima[c] != maxima[c]:
                return False
        # 2. the chunks to search: the first k whose maxima are the k largest
        _select(maxima, k, chunks)
        chunks[:k].sort()
        # 3. those chunks' values (replaced ones in place), then the k best among them
        cand_v = np.empty(k * CHUNK, np.float32)
        cand_i = np.empty(k * CHUNK, np.int64)
        m = 0
        for c in chunks[:k]:
            lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, width)
            for j in range(lo, hi):
                cand_v[m + j - lo] = x[r, j]
                cand_i[m + j - lo] = j
            q = np.searchsorted(at, lo)
            while q < at.size and at[q] < hi:
                cand_v[m + at[q] - lo] = val[q]
                q += 1
            m += hi - lo
        best = np.empty(k, np.int64)
        _select(cand_v[:m], k, best)
        for j in range(k):   # insertion: descending values, the lower id first among equals
            v, i = cand_v[best[j]], cand_i[best[j]]
            q = j
            while q and (out_v[r, q - 1] < v or (out_v[r, q - 1] == v and out_i[r, q - 1] > i)):
                out_v[r, q], out_i[r, q] = out_v[r, q - 1], out_i[r, q - 1]
                q -= 1
            out_v[r, q], out_i[r, q] = v, i
    return True


@cached_njit(error_model="numpy")
def _chunk_max(row, c, at, val):
    """The maximum of chunk c of a row with val put at the sorted ids `at` (NaN if any)."""
    lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, row.size)
    chunk = row[lo:hi].copy()
    q = np.searchsorted(at, lo)
    while q < at.size and at[q] < hi:
        chunk[at[q] - lo] = val[q]
        q += 1
    m = -np.inf
    for v in chunk:
        if v != v:
            return v
        m = max(m, v)
    return m


@cached_njit(error_model="numpy")
def _select(a, k, out):
    """The positions of a's k largest values (the first ones among equals) into out[:k],
    in no particular order: one pass keeping them in a heap whose root is the one to give
    up first (the smallest value, the last position among equals)."""
    hv = np.empty(k, a.dtype)
    for j in range(k):   # the first k, then heapified
        hv[j], out[j] = a[j], j
    for j in range(k // 2 - 1, -1, -1):
        _sift(hv, out, j, k)
    for j in range(k, a.size):
        if a[j] > hv[0]:
            hv[0], out[0] = a[j], j
            _sift(hv, out, 0, k)


@cached_njit(error_model="numpy")
def _sift(hv, hp, i, k):
    """Restore the heap below i: a parent gives up before its children."""
    while True:
        low = i
        for child in (2 * i + 1, 2 * i + 2):
            if child < k and (hv[child] < hv[low]
                              or (hv[child] == hv[low] and hp[child] > hp[low])):
                low = child
        if low == i:
            return
        hv[i], hv[low] = hv[low], hv[i]
        hp[i], hp[low] = hp[low], hp[i]
        i = low
