"""numba kernels for GGML block-quantized weights on the CPU (the PyTorch backend's CPU path).

Layout ("row-interleaved blocks"): a weight (N rows, K columns) in a GGML block type with
BS elements and TS bytes per block is stored as

    P  uint8 (G, nb, TS, R)    rows g*R .. g*R+R-1, R = 64 rows per group, G = N // R
    Pt uint8 (1, nb, TS, Rt)   the last N % R rows (Rt = 0 when N is a multiple of 64)

i.e. byte t of block b of row g*R + r is P[g, b, t, r]: the GGML block bytes are kept as
they are (exactly the GGUF data size, nothing expanded, fp16 scales stay fp16), transposed
so that the same byte of 64 consecutive rows is contiguous. The kernels vectorize across
rows (16 rows per AVX-512 register): a byte plane is unpacked for 16 rows at once and
multiplied by a broadcast activation, with no horizontal reductions or shuffles.

Each GGML type is described by an integer code q per element (0..15, 0..31, int8, a
codebook value...), a "unit" of U = 16 or 32 elements sharing one affine map, and per-unit
scale a and bias c such that the reference value is exactly

    w = a * (q + QOFF) + c        (float32, in this order: bit-exact with
                                   gguf.quants.dequantize; see _Q_CODE and _SCALE_CODE)

Kernels (one set per type, generated as Python source, see kernel_source):
    gemv1     M = 1: y[n] = sum_units a*(sum_j q_j x_j) + (a*QOFF + c)*(sum_j x_j), fp32
    gemm_s    small M: each unit of 64 rows is dequantized into an L1-resident fp32 tile
              that every row of x reads (the weight bytes are read once for all M rows)
    deq_t     a range of row groups into a transposed fp32 tile (W[rows].T) for torch.mm,
              dequantize() and the input gradient
    deq_rows  selected rows (embedding lookup)
All four are numba parallel gufuncs over the row groups; they use numba's thread pool
(set_num_threads) and keep their compiled code in numba's on-disk cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from gguf import GGMLQuantizationType as QT

# --- numba configuration (before any kernel is defined or launched) -------------------------


def _configure_numba() -> None:
    import numba

    # The omp layer launches a parallel region in ~2 us; numba's fallback "workqueue" layer
    # costs 25-100 us per launch, which would dominate decode. Respect an explicit choice.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


_configure_numba()

import numba  # noqa: E402
from llvmlite import ir  # noqa: E402

from numba import guvectorize  # noqa: E402
from numba.core import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

R = 64  # rows per interleaved group (4 AVX-512 vectors; measured best of 16/32/64)

# --- tiny LLVM helpers: integer bit fields -> float32 without numba's int64 promotion --------
# numba types uint8 & int as int64, which makes LLVM vectorize with 8 lanes and vcvtqq2ps;
# these emit 32-bit integer ops that vectorize to 16 lanes.


def _to_i32(context, builder, val, ty):
    i32 = ir.IntType(32)
    v = context.cast(builder, val, ty, types.int64) if ty != types.int64 else val
    return builder.trunc(v, i32)


def _zext32(builder, v):
    i32 = ir.IntType(32)
    w = v.type.width
    if w < 32:
        return builder.zext(v, i32)
    if w > 32:
        return builder.trunc(v, i32)
    return v


@intrinsic
def _bits(typingctx, v, shift, mask):
    """float32((v >> shift) & mask) for an unsigned integer v."""
    if not (isinstance(v, types.Integer) and not v.signed):
        return None
    if not (isinstance(shift, types.Integer) and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x = _zext32(builder, args[0])
        sh = _to_i32(context, builder, args[1], sig.args[1])
        mk = _to_i32(context, builder, args[2], sig.args[2])
        return builder.sitofp(builder.and_(builder.lshr(x, sh), mk), ir.FloatType())

    return types.float32(v, shift, mask), codegen


@intrinsic
def _bits2(typingctx, a, ash, amask, b, bsh, bmask, bls):
    """float32(((a >> ash) & amask) | (((b >> bsh) & bmask) << bls)) for unsigned a, b."""
    for t in (a, b):
        if not (isinstance(t, types.Integer) and not t.signed):
            return None

    def codegen(context, builder, sig, args):
        x = builder.and_(builder.lshr(_zext32(builder, args[0]),
                                      _to_i32(context, builder, args[1], sig.args[1])),
                         _to_i32(context, builder, args[2], sig.args[2]))
        y = builder.and_(builder.lshr(_zext32(builder, args[3]),
                                      _to_i32(context, builder, args[4], sig.args[4])),
                         _to_i32(context, builder, args[5], sig.args[5]))
        y = builder.shl(y, _to_i32(context, builder, args[6], sig.args[6]))
        return builder.sitofp(builder.or_(x, y), ir.FloatType())

    return types.float32(a, ash, amask, b, bsh, bmask, bls), codegen


@intrinsic
def _i8(typingctx, v):
    """float32 of a uint8 byte read as int8."""
    if v != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], ir.FloatType())  # i8 in LLVM is sign-agnostic

    return types.float32(v), codegen


@intrinsic
def _f16(typingctx, lo, hi):
    """float32 of the IEEE half whose little-endian bytes are (lo, hi). Exact (subnormals too)."""
    if lo != types.uint8 or hi != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        i16 = ir.IntType(16)
        h = builder.or_(builder.zext(args[0], i16), builder.shl(builder.zext(args[1], i16),
                                                                 ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return types.float32(lo, hi), codegen


# --- per-type description ----------------------------------------------------------------------

# code: (block elements BS, block bytes TS, unit U, QOFF, has bias c)
TYPE_INFO = {
    int(QT.Q4_0): (32, 18, 32, -8.0, False),
    int(QT.Q4_1): (32, 20, 32, 0.0, True),
    int(QT.Q5_0): (32, 22, 32, -16.0, False),
    int(QT.Q5_1): (32, 24, 32, 0.0, True),
    int(QT.Q8_0): (32, 34, 32, 0.0, False),
    int(QT.IQ4_NL): (32, 18, 32, 0.0, False),
    int(QT.Q2_K): (256, 84, 16, 0.0, True),
    int(QT.Q3_K): (256, 110, 16, -4.0, False),
    int(QT.Q4_K): (256, 144, 32, 0.0, True),
    int(QT.Q5_K): (256, 176, 32, 0.0, True),
    int(QT.Q6_K): (256, 210, 16, -32.0, False),
}

_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                    dtype=np.float32)
# IQ4_NL's codebook as rint(p(n)) for the nibble n, p a quartic fitted minimax-style: max
# |p(n) - kvalues[n]| = 0.433 < 0.5, so rounding gives the codebook exactly (checked below for
# all 16 nibbles, with and without fused multiply-adds). Five vector instructions, where a
# table lookup vectorizes to a gather (measured 4-5x slower).
_IQ4_POLY = (0.0015860428231561545, 0.03108643933386466, -1.3719270420301668,
             24.17383029341806, -126.56701030927852)


def _check_iq4_poly() -> None:
    n = np.arange(16, dtype=np.float32)
    c = [np.float32(v) for v in _IQ4_POLY]
    v = (((c[0] * n + c[1]) * n + c[2]) * n + c[3]) * n + c[4]
    v64 = (((float(c[0]) * n.astype(np.float64) + float(c[1])) * n + float(c[2])) * n
           + float(c[3])) * n + float(c[4])  # the fused (unrounded) evaluation, near enough
    assert np.array_equal(np.rint(v), _KVALUES) and np.array_equal(np.rint(v64), _KVALUES)
    assert np.abs(v - _KVALUES).max() < 0.45


_check_iq4_poly()

# q: the integer code of element J (0 <= J < U) of unit u of a block, row lane r, as a float32
# expression over the byte planes blk[byte, r] (layouts from ggml-common.h / gguf-py quants.py).
# Each entry is (statements run once per unit, expression). In the expression, {...} holds a
# Python expression of J: the generator folds it to a number where J is a constant (the
# unrolled dot products) and leaves it symbolic in the loops over j (dequantization), which
# keeps the generated code, and numba's compile time, small.
# Legacy blocks: byte j of qs holds element j (low nibble) and j + 16 (high nibble); Q5 adds
# bit j of the 32-bit qh. K-quants: element e = u*U + J of the 256-block; for U = 16 that is
# n = e >> 7 = u >> 3, t = (e >> 5) & 3 = (u >> 1) & 3, l = e & 31 = 16*(u & 1) + J.
_Q_CODE = {
    int(QT.Q4_0): ("", "_bits(blk[{2 + (J & 15)}, r], {4 * (J >> 4)}, 15)"),
    int(QT.Q4_1): ("", "_bits(blk[{4 + (J & 15)}, r], {4 * (J >> 4)}, 15)"),
    int(QT.Q5_0): ("", "_bits2(blk[{6 + (J & 15)}, r], {4 * (J >> 4)}, 15, "
                       "blk[{2 + (J >> 3)}, r], {J & 7}, 1, 4)"),
    int(QT.Q5_1): ("", "_bits2(blk[{8 + (J & 15)}, r], {4 * (J >> 4)}, 15, "
                       "blk[{4 + (J >> 3)}, r], {J & 7}, 1, 4)"),
    int(QT.Q8_0): ("", "_i8(blk[{2 + J}, r])"),
    int(QT.IQ4_NL): ("", "np.rint((((C0 * N + C1) * N + C2) * N + C3) * N + C4)".replace(
        "N", "_bits(blk[{2 + (J & 15)}, r], {4 * (J >> 4)}, 15)")),
    # Q2_K: qs[64] at 16; element 128n+32t+l is bits 2t..2t+1 of qs[32n + l]
    int(QT.Q2_K): ("qa = blk[16 + 32 * (u >> 3) + 16 * (u & 1):]\nsa = 2 * ((u >> 1) & 3)",
                   "_bits(qa[{J}, r], sa, 3)"),
    # Q3_K: hmask[32] at 0, qs[64] at 32; q + 4 = 2 low bits | (bit 4n+t of hmask[l]) << 2
    int(QT.Q3_K): ("qa = blk[32 + 32 * (u >> 3) + 16 * (u & 1):]\nsa = 2 * ((u >> 1) & 3)\n"
                   "qb = blk[16 * (u & 1):]\nsb = 4 * (u >> 3) + ((u >> 1) & 3)",
                   "_bits2(qa[{J}, r], sa, 3, qb[{J}, r], sb, 1, 2)"),
    # Q4_K: qs[128] at 16; sub-block u is nibble (u & 1) of qs[32 (u >> 1) + J]
    int(QT.Q4_K): ("qa = blk[16 + 32 * (u >> 1):]\nsa = 4 * (u & 1)",
                   "_bits(qa[{J}, r], sa, 15)"),
    # Q5_K: qh[32] at 16, qs[128] at 48; the fifth bit is bit u of qh[J]
    int(QT.Q5_K): ("qa = blk[48 + 32 * (u >> 1):]\nsa = 4 * (u & 1)",
                   "_bits2(qa[{J}, r], sa, 15, blk[{16 + J}, r], u, 1, 4)"),
    # Q6_K: ql[128] at 0, qh[64] at 128: nibble (t >> 1) of ql[64n + 32(t & 1) + l] and bits
    # 2t..2t+1 of qh[32n + l]; q + 32
    int(QT.Q6_K): ("qa = blk[64 * (u >> 3) + 32 * ((u >> 1) & 1) + 16 * (u & 1):]\n"
                   "sa = 4 * ((u >> 2) & 1)\n"
                   "qb = blk[128 + 32 * (u >> 3) + 16 * (u & 1):]\nsb = 2 * ((u >> 1) & 3)",
                   "_bits2(qa[{J}, r], sa, 15, qb[{J}, r], sb, 3, 4)"),
}


def _q_at(code: int, j) -> str:
    """The q expression of a type for element j: an int (folded) or the loop variable name."""
    expr = _Q_CODE[code][1]
    out, pos = [], 0
    while (i := expr.find("{", pos)) >= 0:
        k = expr.index("}", i)
        inner = expr[i + 1:k]
        out.append(expr[pos:i])
        out.append(str(eval(inner, {"J": j})) if isinstance(j, int)
                   else "(" + inner.replace("J", j) + ")")
        pos = k + 1
    out.append(expr[pos:])
    return "".join(out)


# Statements setting a, c (float32) of unit u, row lane r, such that w = a * (q + QOFF) + c in
# exactly the reference's order of float32 operations. Every product here is exact in float32
# (an fp16 scale times an integer of at most 8 bits), so the only rounding, as in the reference,
# is the final add of the bias.
_KSCALE = """if u < 4:
    sc = _bits(blk[4 + u, r], 0, 63)
    mn = _bits(blk[8 + u, r], 0, 63)
else:
    sc = _bits2(blk[8 + u, r], 0, 15, blk[u, r], 6, 3, 4)
    mn = _bits2(blk[8 + u, r], 4, 15, blk[4 + u, r], 6, 3, 4)
a = _f16(blk[0, r], blk[1, r]) * sc
c = -(_f16(blk[2, r], blk[3, r]) * mn)"""
_D0 = "a = _f16(blk[0, r], blk[1, r])\nc = np.float32(0.0)"
_DM = "a = _f16(blk[0, r], blk[1, r])\nc = _f16(blk[2, r], blk[3, r])"
_SCALE_CODE = {
    int(QT.Q4_0): _D0,
    int(QT.Q4_1): _DM,
    int(QT.Q5_0): _D0,
    int(QT.Q5_1): _DM,
    int(QT.Q8_0): _D0,
    int(QT.IQ4_NL): _D0,
    # Q2_K: scales[16] at 0 (low nibble scale, high nibble min), d at 80, dmin at 82
    int(QT.Q2_K): ("a = _f16(blk[80, r], blk[81, r]) * _bits(blk[u, r], 0, 15)\n"
                   "c = -(_f16(blk[82, r], blk[83, r]) * _bits(blk[u, r], 4, 15))"),
    # Q3_K: 16 6-bit scales packed in 12 bytes at 96 (low 4 bits: byte u & 7, nibble u >> 3;
    # high 2 bits: byte 8 + (u & 3), bits 2(u >> 2)), minus 32; d at 108
    int(QT.Q3_K): ("a = _f16(blk[108, r], blk[109, r]) * (_bits2(blk[96 + (u & 7), r], "
                   "4 * (u >> 3), 15, blk[104 + (u & 3), r], 2 * (u >> 2), 3, 4) - np.float32(32.0))\n"
                   "c = np.float32(0.0)"),
    # Q4_K/Q5_K: d at 0, dmin at 2, 8 6-bit (scale, min) pairs in 12 bytes at 4 (get_scale_min_k4)
    int(QT.Q4_K): _KSCALE,
    int(QT.Q5_K): _KSCALE,
    # Q6_K: int8 scales[16] at 192, d at 208
    int(QT.Q6_K): "a = _f16(blk[208, r], blk[209, r]) * _i8(blk[192 + u, r])\nc = np.float32(0.0)",
}

# --- kernel source ------------------------------------------------------------------------------
# The loop over the U (16/32) elements of a unit must be fully unrolled so that the loop over the
# rows of a group is the innermost one, which LLVM then vectorizes across rows. LLVM's default
# unroll budget does not cover the heavier decoders (measured: Q4_1 GEMV 710 us instead of 60 us
# at 1536x576 on one thread), and numba-level inlining of 16-32 calls per kernel takes 20-50 s
# to compile. So the kernels are generated as Python source with each type's expressions
# written out, kept in a file (numba's cache=True needs one), and compiled lazily per
# (kind, type) as parallel gufuncs over row groups: numba's prange would re-type the whole loop
# body for its parfor lowering (measured 2-3x the compile time, same run time).

_TEMPLATE = """
def gemv1_{name}(gi, P, Pt, x, y, done):
    # y[n] += x . W[n] for the rows n of group gi: integer codes times x, scaled once per unit.
    G = P.shape[0]
    nb = P.shape[1]
    if gi < G:
        B = P[gi]
    else:
        B = Pt[0]
    Rg = B.shape[2]
    acc = np.zeros(Rg, np.float32)
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
    for b in range(nb):
        blk = B[b]
        for u in range({NU}):
            base = (b * {NU} + u) * {U}
{pre12}
            for r in range(Rg):
{scale16}
                av[r] = a
                cv[r] = a * np.float32({QOFF}) + c
            xb = x[base:base + {U}]
            t = np.float32(0.0)
            for j in range({U}):
                t += xb[j]
            for r in range(Rg):
                s = {dot}
                acc[r] += av[r] * s + cv[r] * t
    row0 = gi * {R}
    for r in range(Rg):
        y[row0 + r] = acc[r]
    done[0] = 1


def gemm_s_{name}(gi, P, Pt, X, Y, done):
    # Y[:, rows of group gi] = X @ W[rows].T: each unit is dequantized once into an
    # L1-resident fp32 tile ({U} x 64) that every row of X then reads.
    G = P.shape[0]
    nb = P.shape[1]
    M = X.shape[0]
    if gi < G:
        B = P[gi]
    else:
        B = Pt[0]
    Rg = B.shape[2]
    acc = np.zeros((M, Rg), np.float32)
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
    w = np.empty(({U}, Rg), np.float32)
    for b in range(nb):
        blk = B[b]
        for u in range({NU}):
            base = (b * {NU} + u) * {U}
{pre12}
            for r in range(Rg):
{scale16}
                av[r] = a
                cv[r] = c
            for j in range({U}):
                wj = w[j]
                for r in range(Rg):
                    wj[r] = {wval}
            for m in range(M):
                xb = X[m, base:base + {U}]
                am = acc[m]
                for r in range(Rg):
                    am[r] += {fdot}
    row0 = gi * {R}
    for m in range(M):
        for r in range(Rg):
            Y[m, row0 + r] = acc[m, r]
    done[0] = 1


def deq_t_{name}(gi, g0, P, Pt, Wt, done):
    # Wt[k, (gi - g0)*R + r] = W[gi*R + r, k] (gi == G is the tail group). Bit-exact with
    # gguf.quants.dequantize (compiled without fastmath).
    G = P.shape[0]
    nb = P.shape[1]
    if gi < G:
        B = P[gi]
    else:
        B = Pt[0]
    Rg = B.shape[2]
    col0 = (gi - g0) * {R}
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
    for b in range(nb):
        blk = B[b]
        for u in range({NU}):
            base = (b * {NU} + u) * {U}
{pre12}
            for r in range(Rg):
{scale16}
                av[r] = a
                cv[r] = c
            for j in range({U}):
                wj = Wt[base + j, col0:col0 + Rg]
                for r in range(Rg):
                    wj[r] = {wval}
    done[0] = 1


def deq_rows_{name}(i, n, P, Pt, out, done):
    # out[i, :] = W[n, :] (0 <= n < N checked by the caller). Bit-exact.
    G = P.shape[0]
    nb = P.shape[1]
    gi = n // {R}
    r = n - gi * {R}
    if gi < G:
        B = P[gi]
    else:
        B = Pt[0]
    for b in range(nb):
        blk = B[b]
        for u in range({NU}):
            base = (b * {NU} + u) * {U}
{pre12}
{scale12}
            for j in range({U}):
                out[i, base + j] = {val}
    done[0] = 1
"""

_HEADER = (
    '"""numba kernels generated by diptych.backends.torch.cpu.kernels (do not edit)."""\n'
    "import numpy as np\n"
    "from diptych.backends.torch.cpu.kernels import _bits, _bits2, _i8, _f16\n"
    "C0, C1, C2, C3, C4 = (np.float32(c) for c in {0!r})\n"
).format(tuple(_IQ4_POLY))

_P4 = "uint8[:, :, :, ::1]"
# kind: (numba signature, gufunc layout, fastmath)
_GUFUNC = {
    "gemv1": (f"void(int64, {_P4}, {_P4}, float32[::1], float32[::1], int8[:])",
              "(),(a,b,c,d),(e,f,g,h),(k),(n)->()", True),
    "gemm_s": (f"void(int64, {_P4}, {_P4}, float32[:, ::1], float32[:, ::1], int8[:])",
               "(),(a,b,c,d),(e,f,g,h),(m,k),(p,n)->()", True),
    "deq_t": (f"void(int64, int64, {_P4}, {_P4}, float32[:, ::1], int8[:])",
              "(),(),(a,b,c,d),(e,f,g,h),(k,n)->()", False),
    "deq_rows": (f"void(int64, int64, {_P4}, {_P4}, float32[:, ::1], int8[:])",
                 "(),(),(a,b,c,d),(e,f,g,h),(m,k)->()", False),
}
KINDS = tuple(_GUFUNC)


def _indent(code: str, n: int) -> str:
    return "\n".join(" " * n + line for line in code.splitlines())


def _dot(terms: list[str]) -> str:
    """A sum of terms as four interleaved partial sums (short dependency chains)."""
    parts = ["(" + " + ".join(terms[i::4]) + ")" for i in range(4)]
    return f"(({parts[0]} + {parts[1]}) + ({parts[2]} + {parts[3]}))"


def kernel_source(code: int) -> str:
    """Python source of the kernels of one GGML type (see the comment above _TEMPLATE)."""
    bs, _ts, unit, qoff, hasc = TYPE_INFO[code]
    qj = _q_at(code, "j")
    qoff_s = f"np.float32({qoff})"
    wval = f"av[r] * ({qj} + {qoff_s})" + (" + cv[r]" if hasc else "")
    val = f"a * ({qj} + {qoff_s})" + (" + c" if hasc else "")
    pre = _Q_CODE[code][0] or "pass"
    return _HEADER + _TEMPLATE.format(
        name=QT(code).name, U=unit, NU=bs // unit, QOFF=qoff, R=R, wval=wval, val=val,
        dot=_dot([f"{_q_at(code, j)} * xb[{j}]" for j in range(unit)]),
        fdot=_dot([f"w[{j}, r] * xb[{j}]" for j in range(unit)]), pre12=_indent(pre, 12),
        scale16=_indent(_SCALE_CODE[code], 16), scale12=_indent(_SCALE_CODE[code], 12))


def _kernel_dirs() -> list[Path]:
    dirs = []
    try:
        from diptych.paths import cache_dir

        dirs.append(cache_dir() / "kernels")
    except Exception:  # pragma: no cover
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs.append(Path(tempfile.gettempdir()) / f"diptych-kernels-{uid}")
    return dirs


def _load_kernel_module(code: int):
    """Write one type's generated source (a file per type and content hash, so numba's cache
    stays valid and a change to one type recompiles only that type) into diptych's cache
    folder (numba caches the compiled kernels next to it) and import it."""
    src = kernel_source(code)
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    name = f"diptych_qk_{QT(code).name}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = None
    for d in _kernel_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            candidate = d / f"{name}.py"
            if not candidate.exists() or candidate.read_text() != src:
                tmp = d / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(src)
                os.replace(tmp, candidate)
            path = candidate
            break
        except OSError:
            continue
    if path is None:  # pragma: no cover
        raise OSError("diptych: no writable folder for the generated numba kernels")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache refers to the kernels' module by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


_KERNELS: dict[tuple[str, int], object] = {}
_LOCK = threading.Lock()


def kernel(kind: str, ggml_type: int):
    """The gufunc `kind` (one of KINDS) for a GGML type code, compiled on first use (1-3 s) or
    loaded from numba's on-disk cache (milliseconds). Use the wrappers below to call it."""
    key = (kind, int(ggml_type))
    k = _KERNELS.get(key)
    if k is None:
        if kind not in _GUFUNC or int(ggml_type) not in TYPE_INFO:
            raise KeyError(f"no CPU kernel {kind!r} for GGML type {ggml_type}")
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                mod = _load_kernel_module(int(ggml_type))
                sig, layout, fast = _GUFUNC[kind]
                py = getattr(mod, f"{kind}_{QT(int(ggml_type)).name}")
                k = guvectorize(sig, layout, target="parallel", nopython=True, fastmath=fast,
                                cache=True)(py)
                _KERNELS[key] = k
    return k


def _groups(P: np.ndarray, Pt: np.ndarray) -> int:
    return P.shape[0] + (1 if Pt.shape[3] else 0)


def gemv1(t: int, P, Pt, x: np.ndarray, y: np.ndarray, gidx: np.ndarray | None = None) -> None:
    """y (N,) = W @ x for x (K,) float32; gidx: np.arange(groups) (cached by the caller)."""
    if gidx is None:
        gidx = np.arange(_groups(P, Pt), dtype=np.int64)
    kernel("gemv1", t)(gidx, P, Pt, x, y)


def gemm_s(t: int, P, Pt, X: np.ndarray, Y: np.ndarray, gidx: np.ndarray | None = None) -> None:
    """Y (M, N) = X @ W.T for a few rows X (M, K) float32."""
    if gidx is None:
        gidx = np.arange(_groups(P, Pt), dtype=np.int64)
    kernel("gemm_s", t)(gidx, P, Pt, X, Y)


def deq_t(t: int, P, Pt, g0: int, g1: int, Wt: np.ndarray) -> None:
    """Wt[:, :rows] = W[g0*R : min(g1*R, N)].T (groups g0..g1-1); Wt is (K, >= rows), C order."""
    kernel("deq_t", t)(np.arange(g0, g1, dtype=np.int64), g0, P, Pt, Wt)


def deq_rows(t: int, P, Pt, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = W[ids[i]] (ids int64, already bounds-checked)."""
    kernel("deq_rows", t)(np.arange(len(ids), dtype=np.int64), ids, P, Pt, out)


def _warm_many(tasks) -> None:
    for kind, t in tasks:
        kernel(kind, t)


def _is_cached(kind: str, ggml_type: int) -> bool:
    """Whether numba's cache holds this kernel (without loading or compiling it)."""
    mod = _load_kernel_module(int(ggml_type))
    cache = Path(mod.__file__).parent / "__pycache__"
    prefix = f"guf-{mod.__name__}.{kind}_{QT(int(ggml_type)).name}-"
    return cache.is_dir() and any(p.name.startswith(prefix) and p.suffix == ".nbi"
                                  for p in cache.iterdir())


def precompile(types=None, kinds=KINDS, processes: int | None = None) -> int:
    """Make sure the kernels for `types` (GGML type codes; default all) are in numba's on-disk
    cache. numba compiles one function at a time (about 1-3 s each), so missing kernels are
    compiled in up to `processes` subprocesses (default: the CPU count). Returns how many
    kernels were compiled."""
    types = [int(t) for t in (types if types is not None else TYPE_INFO)]
    todo = [(k, t) for t in types for k in kinds if not _is_cached(k, t)]
    if not todo:
        return 0
    n = max(1, min(processes or os.cpu_count() or 1, len(todo)))
    if n == 1:
        _warm_many(todo)
        return len(todo)
    import concurrent.futures
    import multiprocessing

    chunks = [todo[i::n] for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        for f in [pool.submit(_warm_many, c) for c in chunks]:
            f.result()
    return len(todo)


# --- repacking ----------------------------------------------------------------------------------


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


def set_num_threads(n: int) -> None:
    """Threads for the numba kernels (numba keeps this per calling thread)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def get_num_threads() -> int:
    return numba.get_num_threads()
