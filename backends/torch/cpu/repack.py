"""GGML rows -> the CPU kernels' "row-interleaved blocks" layout (once, at load).

A weight (N rows, K columns) in a GGML block type with TS bytes per block is stored as

    P  uint8 (G, nb, TS, R)    rows g*R .. g*R+R-1, R = 64 rows per group, G = N // R
    Pt uint8 (1, nb, TS, Rt)   the last N % R rows (Rt = 0 when N is a multiple of 64)

i.e. byte t of block b of row g*R + r is P[g, b, t, r]: the GGML block bytes are kept as
they are (exactly the GGUF data size, nothing expanded, fp16 scales stay fp16), transposed
so that the same byte of 64 consecutive rows is contiguous. The kernels vectorize across
rows (16 rows per AVX-512 register): a byte plane is unpacked for 16 rows at once and
multiplied by a broadcast activation, with no horizontal reductions or shuffles.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

R = 64  # rows per interleaved group (4 AVX-512 vectors; measured best of 16/32/64)


def repack(blocks: list[np.ndarray], row_bytes: int, type_size: int,
           rows_per_chunk: int = 4096, release=None, threads: int = 1
           ) -> tuple[np.ndarray, np.ndarray]:
    """Raw GGML rows -> (P, Pt) in the row-interleaved layout. `blocks` are (rows, row_bytes)
    uint8 arrays stacked in order (a fused QKV's q, k and v); each but the last holds a whole
    number of R-row groups, so that no group straddles two of them.

    Works chunk by chunk straight from the blocks (usually memory maps), so the only new
    memory is the repacked copy itself (same size as the data); `release()`, when given, is
    called after each chunk to let the mapped pages already read go (QuantTensor.release).
    With `threads` > 1 the chunks are copied on that many threads (numpy's strided copies
    release the GIL; most of a repack is first touching the new pages)."""
    if any(len(b) % R for b in blocks[:-1]):
        raise ValueError(f"only the last block of rows may end in a partial {R}-row group")
    nb = row_bytes // type_size
    n_rows = sum(len(b) for b in blocks)
    G = n_rows // R
    rt = n_rows - G * R
    P = np.empty((G, nb, type_size, R), np.uint8)
    gpc = max(1, rows_per_chunk // R)
    chunks, g_base = [], 0
    for data in blocks:
        groups = len(data) // R
        chunks += [(data, g_base, g0, min(groups, g0 + gpc)) for g0 in range(0, groups, gpc)]
        g_base += groups

    def copy(chunk) -> None:
        data, base, g0, g1 = chunk
        src = np.asarray(data[g0 * R:g1 * R]).reshape(g1 - g0, R, nb, type_size)
        P[base + g0:base + g1] = src.transpose(0, 2, 3, 1)
        if release is not None:
            release()

    if threads > 1 and len(chunks) > 1:
        # map cancels the chunks still queued when one fails or Ctrl+C comes
        list(_pool(threads).map(copy, chunks))
    else:
        for chunk in chunks:
            copy(chunk)
    Pt = np.empty((1, nb, type_size, rt), np.uint8)
    if rt:
        tail = np.asarray(blocks[-1][len(blocks[-1]) - rt:])
        Pt[0] = tail.reshape(rt, nb, type_size).transpose(1, 2, 0)
    return P, Pt


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="diptych-repack")


def n_groups(P: np.ndarray, Pt: np.ndarray) -> int:
    """Row groups of a repacked weight, the tail group included."""
    return P.shape[0] + (1 if Pt.shape[3] else 0)
