"""GGML rows -> the CPU kernels' "row-interleaved blocks" layout (once, at load).

A weight (N rows, K columns) in a GGML block type with TS bytes per block is stored as

    P  uint8 (G, nb, TS, R)    rows g*R .. g*R+R-1, R = 64 rows per group, G = N // R
    Pt uint8 (1, nb, TS, Rt)   the last N % R rows (Rt = 0 when N is a multiple of 64)

i.e. byte t of block b of row g*R + r is P[g, b, t, r]: the GGML block bytes are kept as
they are (exactly the GGUF data size, nothing expanded, fp16 scales stay fp16), transposed
so that the same byte of 64 consecutive rows is contiguous. The kernels vectorize across
rows (16 rows per AVX-512 register): a byte plane is unpacked for 16 rows at once and
multiplied by a broadcast activation, with no horizontal reductions or shuffles.

Within a group this is a transpose of bytes (the group's R rows of row_bytes bytes become
row_bytes rows of R), done 16 x 16 bytes at a time in vector registers.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .cached_njit import cached_njit

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
    With `threads` > 1 the chunks are copied on that many threads (the transposing kernel
    releases the GIL)."""
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

    from .kernel_cache import call_announced   # kernel_cache -> kernel_source -> R: a cycle

    planes = P.reshape(G, row_bytes, R)   # group g: its rows' bytes transposed

    def copy(chunk) -> None:
        data, base, g0, g1 = chunk
        src = np.ascontiguousarray(data[g0 * R:g1 * R]).view()
        src.flags.writeable = False   # one compiled kernel for mapped and in-memory rows
        call_announced(_transpose_groups, (src, planes[base + g0:base + g1]),
                       "weight repacking kernel")
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


# A 16 x 16 byte tile transposed in registers, the repack's inner step. It lives here, not in
# llvm_bits.py: numba keys _transpose_groups' cache on this file alone, so an edit to the
# intrinsic elsewhere would leave the old machine code in use.
_I32 = ir.IntType(32)
_BYTES = ir.VectorType(ir.IntType(8), 16)


def _transpose_network() -> tuple[list, list]:
    """The 16 x 16 byte transpose as four rounds of interleaves (x86's punpck{l,h}: bytes,
    then pairs, quads, octets of bytes): ([(unit bytes, a, b, lo out, hi out)], the vector
    holding column c at the end). Found by following each byte's (row, column) label, so the
    result is checked here rather than derived by hand."""
    vecs = {i: [(i, c) for c in range(16)] for i in range(16)}
    steps, fresh = [], 16
    for g in (1, 2, 4, 8):
        key = {k: (v[0][0], frozenset(c for _, c in v)) for k, v in vecs.items()}
        out = {}
        for k, (row, cols) in key.items():
            if row // g % 2 == 0:   # paired with the vector of the next g rows, same columns
                (m,) = [m for m, km in key.items() if km == (row + g, cols)]
                ua = [vecs[k][u:u + g] for u in range(0, 16, g)]
                ub = [vecs[m][u:u + g] for u in range(0, 16, g)]
                half = len(ua) // 2
                out[fresh] = [x for u in range(half) for x in ua[u] + ub[u]]
                out[fresh + 1] = [x for u in range(half, 2 * half) for x in ua[u] + ub[u]]
                steps.append((g, k, m, fresh, fresh + 1))
                fresh += 2
        vecs = out
    column = {}
    for k, v in vecs.items():
        assert [r for r, _ in v] == list(range(16)) and len({c for _, c in v}) == 1
        column[v[0][1]] = k
    return steps, [column[c] for c in range(16)]


_TRANSPOSE, _COLUMN = _transpose_network()


def _interleave(builder, a, b, g: int, hi: bool):
    """x86's punpckl/h on units of g bytes: the low (high) halves of a and b, alternating."""
    n = 16 // g
    ty = ir.VectorType(ir.IntType(8 * g), n)
    first = n // 2 if hi else 0
    order = [i for k in range(first, first + n // 2) for i in (k, n + k)]
    v = builder.shuffle_vector(builder.bitcast(a, ty), builder.bitcast(b, ty),
                               ir.Constant(ir.VectorType(_I32, n), order))
    return builder.bitcast(v, _BYTES)


def _rows_at(context, builder, arrty, arr, row, rowty, col, colty):
    """Pointers to arr[row + i, col] for i < 16 in a 2-D uint8 array with contiguous rows."""
    a = context.make_array(arrty)(context, builder, arr)
    stride0 = cgutils.unpack_tuple(builder, a.strides, 2)[0]
    first = builder.add(builder.mul(context.cast(builder, row, rowty, types.intp), stride0),
                        context.cast(builder, col, colty, types.intp))
    return [builder.bitcast(builder.gep(a.data, [builder.add(
        first, builder.mul(stride0, ir.Constant(stride0.type, i)))]), _BYTES.as_pointer())
        for i in range(16)]


@intrinsic
def tile16(typingctx, src, row, col, dst, dcol):
    """dst[col + j, dcol + i] = src[row + i, col + j] for i, j < 16: a 16 x 16 byte tile
    transposed in registers (16 loads, 64 interleaves, 16 stores), for 2-D uint8 arrays with
    contiguous rows. No bounds check."""
    ok = all(isinstance(a, types.Array) and a.dtype == types.uint8 and a.ndim == 2
             for a in (src, dst)) and dst.mutable
    if not (ok and all(isinstance(i, types.Integer) for i in (row, col, dcol))):
        return None

    def codegen(context, builder, sig, args):
        vecs = {i: builder.load(p, align=1) for i, p in enumerate(_rows_at(
            context, builder, sig.args[0], args[0], args[1], sig.args[1], args[2], sig.args[2]))}
        for g, a, b, lo, hi in _TRANSPOSE:
            vecs[lo] = _interleave(builder, vecs[a], vecs[b], g, False)
            vecs[hi] = _interleave(builder, vecs[a], vecs[b], g, True)
        outs = _rows_at(context, builder, sig.args[3], args[3], args[2], sig.args[2], args[4],
                        sig.args[4])
        for c, p in enumerate(outs):
            builder.store(vecs[_COLUMN[c]], p, align=1)
        return context.get_dummy_value()

    return types.none(src, row, col, dst, dcol), codegen


@cached_njit(nogil=True, boundscheck=False)
def _transpose_groups(src, planes):
    """planes[g, t, r] = src[g * R + r, t]: each group's R rows transposed, 16 x 16 bytes at
    a time in registers (numpy's strided copy moves a byte at a time); the last row_bytes %
    16 columns byte by byte."""
    row_bytes = planes.shape[1]
    full = row_bytes - row_bytes % 16
    for g in range(planes.shape[0]):
        D = planes[g]
        for c in range(0, full, 16):   # one pass over 16 columns of all R rows: 16 whole lines
            for r in range(0, R, 16):
                tile16(src, g * R + r, c, D, r)
        for c in range(full, row_bytes):
            for r in range(R):
                D[c, r] = src[g * R + r, c]


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="diptych-repack")


def n_groups(P: np.ndarray, Pt: np.ndarray) -> int:
    """Row groups of a repacked weight, the tail group included."""
    return P.shape[0] + (1 if Pt.shape[3] else 0)
