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

import numpy as np

R = 64  # rows per interleaved group (4 AVX-512 vectors; measured best of 16/32/64)


def repack(data: np.ndarray, n_rows: int, row_bytes: int, type_size: int,
           rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Raw GGML rows (n_rows, row_bytes) uint8 -> (P, Pt) in the row-interleaved layout.

    Works chunk by chunk straight from `data` (usually a memory map), so the only new memory is
    the repacked copy itself (same size as the data)."""
    nb = row_bytes // type_size
    G = n_rows // R
    rt = n_rows - G * R
    P = np.empty((G, nb, type_size, R), np.uint8)
    gpc = max(1, rows_per_chunk // R)
    for g0 in range(0, G, gpc):
        g1 = min(G, g0 + gpc)
        src = np.asarray(data[g0 * R:g1 * R]).reshape(g1 - g0, R, nb, type_size)
        P[g0:g1] = src.transpose(0, 2, 3, 1)
    Pt = np.empty((1, nb, type_size, rt), np.uint8)
    if rt:
        Pt[0] = np.asarray(data[G * R:]).reshape(rt, nb, type_size).transpose(1, 2, 0)
    return P, Pt


def n_groups(P: np.ndarray, Pt: np.ndarray) -> int:
    """Row groups of a repacked weight, the tail group included."""
    return P.shape[0] + (1 if Pt.shape[3] else 0)
