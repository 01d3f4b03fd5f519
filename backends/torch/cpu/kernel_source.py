"""The numba kernels of the CPU path, generated as Python source per GGML type.

Each GGML type is described by an integer code q per element (0..15, 0..31, int8, a
codebook value...), a "unit" of U = 16 or 32 elements sharing one affine map, and per-unit
scale a and bias c such that the reference value is exactly

    w = a * (q + QOFF) + c        (float32, in this order: bit-exact with
                                   gguf.quants.dequantize; see _q_code and _scale_code)

U, QOFF, whether there is a c, and every byte offset come from quant/formats.py; what is
written here is where inside its fields each element's bits sit.

Kernels (one set per type, over the row-interleaved blocks of repack.py):
    gemv1     M = 1: y[n] = sum_units a*(sum_j q_j x_j) + (a*QOFF + c)*(sum_j x_j), fp32
    gemm_s    any M: 16 rows of W at a time in F32X16 vectors (llvm_bits.py), each weight
              decoded exactly once per block of up to 4 rows of x and multiplied into
              accumulators held in registers (see the comment above _GEMM_S)
    gemm_i8   any M, x as int8 codes (I8_TYPES, CPUs with AVX-512 VNNI): integer dot
              products of 4 codes per lane, scaled per unit (see the comment above _I8_CODE)
    deq_t     a range of row groups into a transposed fp32 tile (W[rows].T) for torch.mm,
              dequantize() and the input gradient
    deq_tb    the same tile as bfloat16 bits (uint16), rounded as torch rounds fp32 to bf16
    deq_rows  selected rows (embedding lookup)
Each is a serial numba function over one row group (deq_rows: one selected row), run in
parallel by a launcher of the same name over an array of indices (kernel_cache.py compiles
them).
"""

from __future__ import annotations

import re

import numpy as np
from gguf import GGMLQuantizationType as QT

from diptych.quant.formats import FORMATS, Field, QuantFormat

from .repack import R

# IQ4_NL's codebook as rint(p(n)) for the nibble n, p a quartic fitted minimax-style: max
# |p(n) - codebook[n]| = 0.433 < 0.5, so rounding gives the codebook exactly (checked below for
# all 16 nibbles, with and without fused multiply-adds). Five vector instructions, where a
# table lookup vectorizes to a gather (measured 4-5x slower).
_IQ4_POLY = (0.0015860428231561545, 0.03108643933386466, -1.3719270420301668,
             24.17383029341806, -126.56701030927852)


def _check_iq4_poly() -> None:
    book = FORMATS[QT.IQ4_NL].codebook.astype(np.float32)
    n = np.arange(16, dtype=np.float32)
    c = [np.float32(v) for v in _IQ4_POLY]
    v = (((c[0] * n + c[1]) * n + c[2]) * n + c[3]) * n + c[4]
    v64 = (((float(c[0]) * n.astype(np.float64) + float(c[1])) * n + float(c[2])) * n
           + float(c[3])) * n + float(c[4])  # the fused (unrounded) evaluation, near enough
    assert np.array_equal(np.rint(v), book) and np.array_equal(np.rint(v64), book)
    assert np.abs(v - book).max() < 0.45


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
def _nibble(f: QuantFormat) -> str:
    return f"bits(blk[{{{f.qs.offset} + (J & 15)}}, r], {{4 * (J >> 4)}}, 15)"


def _q5(f: QuantFormat) -> str:
    return (f"bits2(blk[{{{f.qs.offset} + (J & 15)}}, r], {{4 * (J >> 4)}}, 15, "
            f"blk[{{{f.qh.offset} + (J >> 3)}}, r], {{J & 7}}, 1, 4)")


def _q_code(t: QT) -> tuple[str, str]:
    f = FORMATS[t]
    qs, qh = f.qs.offset, f.qh.offset if f.qh else None
    if t in (QT.Q4_0, QT.Q4_1):
        return "", _nibble(f)
    if t in (QT.Q5_0, QT.Q5_1):
        return "", _q5(f)
    if t == QT.Q8_0:
        return "", f"i8(blk[{{{qs} + J}}, r])"
    if t == QT.IQ4_NL:
        return "", "rint((((C0 * N + C1) * N + C2) * N + C3) * N + C4)".replace("N", _nibble(f))
    if t == QT.Q2_K:  # element 128n+32t+l is bits 2t..2t+1 of qs[32n + l]
        return (f"qa = blk[{qs} + 32 * (u >> 3) + 16 * (u & 1):]\nsa = 2 * ((u >> 1) & 3)",
                "bits(qa[{J}, r], sa, 3)")
    if t == QT.Q3_K:  # q + 4 = 2 low bits | (bit 4n+t of hmask[l]) << 2
        return (f"qa = blk[{qs} + 32 * (u >> 3) + 16 * (u & 1):]\nsa = 2 * ((u >> 1) & 3)\n"
                f"qb = blk[{qh} + 16 * (u & 1):]\nsb = 4 * (u >> 3) + ((u >> 1) & 3)",
                "bits2(qa[{J}, r], sa, 3, qb[{J}, r], sb, 1, 2)")
    if t == QT.Q4_K:  # sub-block u is nibble (u & 1) of qs[32 (u >> 1) + J]
        return f"qa = blk[{qs} + 32 * (u >> 1):]\nsa = 4 * (u & 1)", "bits(qa[{J}, r], sa, 15)"
    if t == QT.Q5_K:  # as Q4_K; the fifth bit is bit u of qh[J]
        return (f"qa = blk[{qs} + 32 * (u >> 1):]\nsa = 4 * (u & 1)",
                f"bits2(qa[{{J}}, r], sa, 15, blk[{{{qh} + J}}, r], u, 1, 4)")
    if t == QT.Q6_K:  # nibble (t >> 1) of ql[64n + 32(t & 1) + l], bits 2t..2t+1 of qh[32n + l]
        return (f"qa = blk[{qs} + 64 * (u >> 3) + 32 * ((u >> 1) & 1) + 16 * (u & 1):]\n"
                "sa = 4 * ((u >> 2) & 1)\n"
                f"qb = blk[{qh} + 32 * (u >> 3) + 16 * (u & 1):]\nsb = 2 * ((u >> 1) & 3)",
                "bits2(qa[{J}, r], sa, 15, qb[{J}, r], sb, 3, 4)")
    raise KeyError(t)


#: The GGML types the CPU kernels handle (every quantized type of quant/formats.py).
KERNEL_TYPES = tuple(t for t in FORMATS if FORMATS[t].quantized)
_Q_CODE = {t: _q_code(t) for t in KERNEL_TYPES}


def _q_at(t: QT, j, span=()) -> str:
    """The q expression of a type for element j: an int (folded), or an expression of loop
    variables whose values are `span`; a part of it that is the same for every value in
    span is folded too (e.g. which nibble, within one half of a 32-element unit)."""
    expr = _Q_CODE[t][1]
    out, pos = [], 0
    while (i := expr.find("{", pos)) >= 0:
        k = expr.index("}", i)
        inner = expr[i + 1:k]
        out.append(expr[pos:i])
        values = {eval(inner, {"J": v}) for v in ([j] if isinstance(j, int) else span)}
        out.append(str(values.pop()) if len(values) == 1
                   else "(" + inner.replace("J", j) + ")")
        pos = k + 1
    out.append(expr[pos:])
    return "".join(out)


# Statements setting a, c (float32) of unit u, row lane r, such that w = a * (q + QOFF) + c in
# exactly the reference's order of float32 operations. Every product here is exact in float32
# (an fp16 scale times an integer of at most 8 bits), so the only rounding, as in the reference,
# is the final add of the bias.
def _half(f: Field) -> str:
    return f"f16(blk[{f.offset}, r], blk[{f.offset + 1}, r])"


def _scale_code(t: QT) -> str:
    f = FORMATS[t]
    if f.unit == f.block_size:  # legacy: one d (and m) per block
        c = f"c = {_half(f.m)}" if f.has_bias else "c = np.float32(0.0)"
        return f"a = {_half(f.d)}\n{c}"
    s = f.scales.offset
    if t == QT.Q2_K:  # low nibble scale, high nibble min
        return (f"a = {_half(f.d)} * bits(blk[{s} + u, r], 0, 15)\n"
                f"c = -({_half(f.m)} * bits(blk[{s} + u, r], 4, 15))")
    if t == QT.Q3_K:  # low 4 bits: byte u & 7, nibble u >> 3; high 2: byte 8 + (u & 3),
        # bits 2(u >> 2); minus 32
        return (f"a = {_half(f.d)} * (bits2(blk[{s} + (u & 7), r], 4 * (u >> 3), 15, "
                f"blk[{s + 8} + (u & 3), r], 2 * (u >> 2), 3, 4) - np.float32(32.0))\n"
                "c = np.float32(0.0)")
    if t in (QT.Q4_K, QT.Q5_K):  # 8 6-bit (scale, min) pairs in 12 bytes (get_scale_min_k4)
        return (f"if u < 4:\n"
                f"    sc = bits(blk[{s} + u, r], 0, 63)\n"
                f"    mn = bits(blk[{s + 4} + u, r], 0, 63)\n"
                f"else:\n"
                f"    sc = bits2(blk[{s + 4} + u, r], 0, 15, blk[{s - 4} + u, r], 6, 3, 4)\n"
                f"    mn = bits2(blk[{s + 4} + u, r], 4, 15, blk[{s} + u, r], 6, 3, 4)\n"
                f"a = {_half(f.d)} * sc\n"
                f"c = -({_half(f.m)} * mn)")
    if t == QT.Q6_K:  # int8 scales
        return f"a = {_half(f.d)} * i8(blk[{s} + u, r])\nc = np.float32(0.0)"
    raise KeyError(t)


_SCALE_CODE = {t: _scale_code(t) for t in KERNEL_TYPES}

# --- kernel source ------------------------------------------------------------------------------
# The loop over the U (16/32) elements of a unit must be fully unrolled so that the loop over the
# rows of a group is the innermost one, which LLVM then vectorizes across rows. LLVM's default
# unroll budget does not cover the heavier decoders (measured: Q4_1 GEMV 710 us instead of 60 us
# at 1536x576 on one thread), and numba-level inlining of 16-32 calls per kernel takes 20-50 s
# to compile. So the kernels are generated as Python source with each type's expressions
# written out, kept in a file (numba's cache=True needs one), and compiled lazily per
# (kind, type). A kernel works on one row group; the launcher's prange only calls it, since
# a prange over the kernel's own body would re-type that body for its parfor lowering
# (measured 2-3x the compile time, same run time). The launcher is an njit(parallel=True)
# function rather than a parallel gufunc: numba caches all of it, where a gufunc's parallel
# wrapper is rebuilt by LLVM in every process on first use (BENCHMARKS.md, load).

# The fragments the kernels share: pick the row group gi (the tail group is Pt), and open
# the loop over the units of each block, setting av[r] = a for every row lane.
_GROUP = """    G = P.shape[0]
    nb = P.shape[1]
    if gi < G:
        B = P[gi]
    else:
        B = Pt[0]
    Rg = B.shape[2]
"""
_UNITS = """    for b in range(nb):
        blk = B[b]
        for u in range({NU}):
            base = (b * {NU} + u) * {U}
{pre12}
            for r in range(Rg):
{scale16}
                av[r] = a
"""

_TEMPLATE = """
def gemv1_{name}(gi, P, Pt, x, y):
    # y[n] += x . W[n] for the rows n of group gi: integer codes times x, scaled once per unit.
{group}    acc = np.zeros(Rg, np.float32)
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
{units}                cv[r] = a * np.float32({QOFF}) + c
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


{deq_t}

{deq_tb}


def deq_rows_{name}(i, ids, P, Pt, out):
    # out[i, :] = W[ids[i], :] (0 <= ids[i] < N checked by the caller). Bit-exact.
    n = ids[i]
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
"""

# deq_t and deq_tb: one row group into a tile of W.T, fp32 or bfloat16 bits (uint16)
_DEQ_T = """def {kind}_{name}(gi, g0, P, Pt, Wt):
    # Wt[k, (gi - g0)*R + r] = W[gi*R + r, k] (gi == G is the tail group). Bit-exact with
    # gguf.quants.dequantize (compiled without fastmath); deq_tb rounds it to bf16 as torch does.
{group}    col0 = (gi - g0) * {R}
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
{units}                cv[r] = c
            for j in range({U}):
                wj = Wt[base + j, col0:col0 + Rg]
                for r in range(Rg):
                    wj[r] = {store}
"""

# The row group of gi as whole 16-lane vectors: the tail rows zero-padded, so that every
# 16-lane load is inside.
_VECTOR_GROUP = """    G = P.shape[0]
    nb = P.shape[1]
    if gi < G:
        B = P[gi]
        Rg = B.shape[2]
    else:
        T = Pt[0]
        Rg = T.shape[2]
        B = np.zeros((nb, T.shape[1], (Rg + 15) // 16 * 16), np.uint8)
        for b in range(nb):
            for t in range(T.shape[1]):
                for l in range(Rg):
                    B[b, t, l] = T[b, t, l]
"""

# The loop over a group's blocks in gemm_s's and gemm_i8's row blocks; the first block of
# rows of x in each slice but the first fetches its share of the next group ([pt0, pt1),
# set by _ROW_BLOCKS) into L2.
_BLOCKS = """for b in range(nb):
    blk = B[b]
    if m0 == 0:
        for t in range(pt0, pt1):
            prefetch(Bn[b], t)
"""

# gemm_s and gemm_i8: 16 rows of W at a time, the rows of x in blocks of 4, 2 or 1.
_ROW_BLOCKS = """
def {kind}_{name}(gi, P, Pt, {xargs}, Y):
    # Y[:, rows of group gi] = X @ W[rows].T (see the comment above _{KIND}).
""" + _VECTOR_GROUP + """    M = Y.shape[0]
    row0 = gi * {R}
    # The first slice streams the group from memory; while the other three run from the
    # caches, each fetches a third of the next group's byte planes (prefetch) into L2.
    Bn = P[gi + 1] if gi + 1 < G else B
    TS = B.shape[1]
    pt0 = 0
    pt1 = 0
{whole}    for r in range(0, Rg, 16):
        n = min(16, Rg - r)
        if gi + 1 < G and r > 0:
            pt0 = (r // 16 - 1) * TS // 3
            pt1 = (r // 16) * TS // 3
        m0 = 0
        while m0 < M:
            left = M - m0
            if left > 2:
{rows4}
                m0 += 4
            elif left == 2:
{rows2}
                m0 += 2
            else:
{rows1}
                m0 += 1
"""

# gemm_s: the rows of x in register blocks. Per 16 rows of W (one F32X16 vector, llvm_bits.py)
# and a block of up to 4 rows of x, each element of W is decoded once (exactly, as deq_t
# does) and multiplied into each row's accumulators, held in registers, x broadcast from
# memory: 4 rows cost one decode and 4 FMAs per 16 weights where a GEMV per row costs 4
# decodes and 4 FMAs. Rows of x go in blocks of 4, then 2 or 1 for what is left (a block's
# missing row repeats its last row and is not stored; blocks of 8 rows were faster at M = 8
# but doubled the compile time, BENCHMARKS.md). Summation, per row: per 16 elements C chains
# (C = 2, or 4 for a single row, whose chains would otherwise wait on the FMA latency) summed
# pairwise and added to the row's accumulator: depth 16/C + log2(C) + K/16 - 1 <= 8 + K/16,
# the bound tests/backends/cpu/test_qlinear.py holds.
_ROWS = """{xrows}
{zeros}
""" + _BLOCKS + """    for u in range({NU}):
        base = (b * {NU} + u) * {U}
{pre}
{scale}
{halves}
{stores}"""

# Units that read the same bytes, decoded together by gemm_s and gemm_i8: _SHARED_UNITS[t] =
# (n, u) runs n units per iteration h of a loop over a block's units, unit c (0 <= c < n)
# being u.format(c=c). LLVM folds u's bit fields to constants, sees that the units load the
# same addresses and loads those bytes once (gemm_s: a byte plane per weight; gemm_i8: a
# quad, four loads and three shuffles, more than a row of x's dot products over it). Q4_K
# and Q5_K: sub-blocks 2h and 2h + 1 are the low and high nibbles of the same bytes. Units
# of 16 (Q2_K, Q3_K, Q6_K): the set of one half (u >> 3) and one parity (u & 1) shares its
# low bits (Q6_K: two sets of ql bytes) and its high bits (Q3_K's hmask, Q6_K's qh). The
# order of the units is the order of a row's sums at every M, so in gemm_i8 a row's bits
# still do not depend on M. Eight units written out instead of four: Q6_K's gemm_i8
# compiled 2x as long, and ran no faster.
_SIXTEEN = (4, "8 * (h >> 1) + (h & 1) + 2 * {c}")
_SHARED_UNITS = {QT.Q4_K: (2, "2 * h + {c}"), QT.Q5_K: (2, "2 * h + {c}"), QT.Q6_K: _SIXTEEN,
                 QT.Q2_K: _SIXTEEN, QT.Q3_K: _SIXTEEN}


def _unit_start(f: QuantFormat, order: str, c: int) -> str:
    """Statements setting u, unit c of a set (`order` from _SHARED_UNITS), and base, where
    its elements start in the row."""
    return f"u = {order.format(c=c)}\nbase = (b * {f.units_per_block} + u) * {f.unit}"


def _unit_names(code: str, c: int) -> str:
    """A unit's statements with the names they set (and u, base) suffixed by the unit's
    place c in its set, so that the set's units sit side by side."""
    return re.sub(r"\b(u|base|qa|sa|qb|sb|a|c|ao)\b", lambda m: f"{m.group(1)}{c}", code)


# gemm_s over the units of _SHARED_UNITS: n units that read the same bytes decoded in one loop
# over their elements, so that LLVM loads each shared byte plane once; per row of x, a unit
# of U elements has U/16 chains (n of them hide the FMA latency), all added pairwise to the
# row's accumulator after the set. Depth 16 + log2(n U/16) + K/(n U), within _ROWS' bound
# for K >= 256.
_SHARED_ROWS = """{xrows}
{zeros}
""" + _BLOCKS + """    for h in range({groups}):
{units}
{chains}
        for j in range(0, {U}, {step}):
{weights}
{fmas}
{adds}
{stores}"""

# 16 elements of a unit (all of a 16-element unit, half of a 32-element one).
_HALF = """{chains}
for j in range({H}, {H} + 16, {C}):
{weights}
{fmas}
{adds}"""


def _vector(expr: str) -> str:
    """A scalar kernel's expression over byte planes (blk[t, r]: row lane r) as the same
    expression over 16 row lanes (ld(blk, t, r): lanes r .. r + 15)."""
    return re.sub(r"(\w+)\[([^\[\]]+), r\]", r"ld(\1, \2, r)", expr)


def _pairwise(terms: list[str]) -> str:
    while len(terms) > 1:
        terms = [f"({a} + {b})" for a, b in zip(terms[::2], terms[1::2])]
    return terms[0]


def _x_row(i: int) -> str:
    """Which row of x row i of a block reads (the block's missing rows repeat its last)."""
    return "m0" if i == 0 else f"m0 + min({i}, left - 1)"


def _stores(mb: int) -> str:
    """Store lanes 0 .. n - 1 of each row's accumulator y{i} (the rows that exist)."""
    return "\n".join(["for l in range(n):\n    Y[m0, row0 + r + l] = lane(y0, l)"] + [
        f"if left > {i}:\n    for l in range(n):\n        Y[m0 + {i}, row0 + r + l] = lane(y{i}, l)"
        for i in range(1, mb)])


def _gemm_rows(t: QT, mb: int) -> str:
    """The body of gemm_s for a block of mb rows of x (m0 .. m0 + mb - 1, clamped to left)."""
    f = FORMATS[t]
    qoff = float(f.code_offset)

    def w(j: str, span) -> str:
        q = _vector(_q_at(t, j, span))
        if f.has_bias:
            return f"fma(a, {q} + np.float32({qoff}), c)" if qoff else f"fma(a, {q}, c)"
        return f"fma(a, {q}, ao)" if qoff else f"a * {q}"

    # a * q + a * QOFF is a * (q + QOFF) rounded once: both products are exact (see
    # _scale_code), so this is the reference's value.
    scale = _vector(_SCALE_CODE[t]) + (f"\nao = a * np.float32({qoff})"
                                       if qoff and not f.has_bias else "")
    rows, chains = range(mb), range(4 if mb == 1 else 2)
    xrows = [f"x{i} = X[{_x_row(i)}]" for i in rows]
    pre = _vector(_Q_CODE[t][0] or "pass")
    if t in _SHARED_UNITS:
        return _shared_rows(t, mb, xrows, pre, scale, w)
    c = len(chains)

    def weights(h) -> str:
        """The decode of elements j .. j + c - 1 of the half at h (None: any half)."""
        return "\n".join(f"w{k} = " + w(f"(j + {k})", () if h is None else range(h + k, h + 16, c))
                         for k in chains)

    def half(h: str, ws: str) -> str:
        return _HALF.format(
            H=h, C=c, weights=_indent(ws, 4),
            chains="\n".join(f"s{i}_{k} = vzero()" for i in rows for k in chains),
            fmas=_indent("\n".join(f"s{i}_{k} = fma(w{k}, at(x{i}, base + j + {k}), s{i}_{k})"
                                   for i in rows for k in chains), 4),
            adds="\n".join(f"y{i} = y{i} + " + _pairwise([f"s{i}_{k}" for k in chains])
                           for i in rows))

    # The halves of a 32-element unit are written out where that folds part of the decode
    # (which nibble of a legacy block's byte: the low half needs no shift). Elsewhere one loop
    # runs over them: written out, LLVM scheduled a whole unit as one block, hoisted its loads
    # and spilled registers (slower at 4 rows of x).
    starts = range(0, f.unit, 16)
    if any(weights(h) != weights(None) for h in starts):
        halves = "\n".join(half(str(h), weights(h)) for h in starts)
    elif f.unit > 16:
        halves = f"for h in range(0, {f.unit}, 16):\n" + _indent(half("h", weights(None)), 4)
    else:
        halves = half("0", weights(None))
    body = _ROWS.format(
        NU=f.units_per_block, U=f.unit, xrows="\n".join(xrows),
        zeros="\n".join(f"y{i} = vzero()" for i in rows),
        pre=_indent(pre, 8), scale=_indent(scale, 8),
        halves=_indent(halves, 8), stores=_stores(mb))
    return _indent(body, 16)


def _shared_rows(t: QT, mb: int, xrows: list[str], pre: str, scale: str, w) -> str:
    """_gemm_rows' body for a type of _SHARED_UNITS (see _SHARED_ROWS); `w(j, span)` is the
    decode of element j of a unit, `pre` and `scale` its statements per unit."""
    f = FORMATS[t]
    rows = range(mb)
    n, order = _SHARED_UNITS[t]
    k = f.unit // 16
    units = "\n".join(_unit_names(f"{_unit_start(f, order, c)}\n{pre}\n{scale}", c)
                       for c in range(n))
    sums = [(c, e) for c in range(n) for e in range(k)]
    body = _SHARED_ROWS.format(
        xrows="\n".join(xrows), zeros="\n".join(f"y{i} = vzero()" for i in rows),
        groups=f.units_per_block // n, units=_indent(units, 8), U=f.unit, step=k,
        chains=_indent("\n".join(f"s{i}_{c}_{e} = vzero()" for i in rows
                                 for c, e in sums), 8),
        weights=_indent("\n".join(f"w{c}_{e} = " + _unit_names(
            w(f"(j + {e})", range(e, f.unit, k)), c) for c, e in sums), 12),
        fmas=_indent("\n".join(f"s{i}_{c}_{e} = fma(w{c}_{e}, at(x{i}, base{c} + j + {e}), "
                                f"s{i}_{c}_{e})" for i in rows for c, e in sums), 12),
        adds=_indent("\n".join(f"y{i} = y{i} + " + _pairwise([f"s{i}_{c}_{e}"
                                                               for c, e in sums])
                                for i in rows), 8),
        stores=_stores(mb))
    return _indent(body, 16)


# gemm_i8: x as int8 codes per 32 values with a float32 scale (int8_activations.py), the
# weights' integer codes multiplied by them exactly in int32, four at a time per lane
# (AVX-512 VNNI's vpdpbusd, llvm_bits.dot4), and scaled once per unit of W:
#     sum_j w_j x_j ~ a d (sum_j q_j xq_j + QOFF S) + c d S,   S = sum_j xq_j
# for the unit's scale a, bias c, code offset QOFF and the block's scale d. A lane holds one
# row of W and 4 consecutive codes (llvm_bits.quad gathers 4 byte planes); codes are
# unsigned bytes (Q8_0's are flipped to code + 128, which the offset takes back). Per row of
# x the integer sums are exact and the float work per unit is the same whatever the block of
# rows, so a row's output does not depend on M (a verify step gives what decode gives).
# _I8_CODE[t]: (statements per unit, statements per group g of 4 codes, [(codes of the
# group, offset of their first element in the unit)], groups per unit); {qs}, {qh} are
# the fields' byte offsets.
_I8_NIBBLES = ("", "v = quad(blk, {qs} + 4 * g, r)",
               [("qfield(v, 0, 15)", "4 * g"), ("qfield(v, 4, 15)", "16 + 4 * g")], 4)
_I8_FIFTH_BITS = ("h = quad(blk, {qh}, r)", "v = quad(blk, {qs} + 4 * g, r)",
                  [("qor(qfield(v, 0, 15), qspread(h, 4 * g), 4)", "4 * g"),
                   ("qor(qfield(v, 4, 15), qspread(h, 16 + 4 * g), 4)", "16 + 4 * g")], 4)
_I8_CODE = {
    QT.Q4_0: _I8_NIBBLES, QT.Q4_1: _I8_NIBBLES,
    QT.Q5_0: _I8_FIFTH_BITS, QT.Q5_1: _I8_FIFTH_BITS,
    QT.Q8_0: ("", "", [("qflip(quad(blk, {qs} + 4 * g, r))", "4 * g")], 8),
    # sub-block u: nibble (u & 1) of qs[32 (u >> 1) + J] (as _q_code)
    QT.Q4_K: ("qa = {qs} + 32 * (u >> 1)\nsa = 4 * (u & 1)", "",
              [("qfield(quad(blk, qa + 4 * g, r), sa, 15)", "4 * g")], 8),
    # as _q_code: element 128n+32t+l, unit u of 16: bits 2t.. of qs[32n + l] (Q3_K: and
    # bit 4n+t of hmask[l]); Q5_K: Q4_K's nibbles and bit u of qh[J]
    QT.Q2_K: ("qa = {qs} + 32 * (u >> 3) + 16 * (u & 1)\nsa = 2 * ((u >> 1) & 3)", "",
              [("qfield(quad(blk, qa + 4 * g, r), sa, 3)", "4 * g")], 4),
    QT.Q3_K: ("qa = {qs} + 32 * (u >> 3) + 16 * (u & 1)\nsa = 2 * ((u >> 1) & 3)\n"
              "qb = {qh} + 16 * (u & 1)\nsb = 4 * (u >> 3) + ((u >> 1) & 3)", "",
              [("qor(qfield(quad(blk, qa + 4 * g, r), sa, 3), "
                "qfield(quad(blk, qb + 4 * g, r), sb, 1), 2)", "4 * g")], 4),
    QT.Q5_K: ("qa = {qs} + 32 * (u >> 1)\nsa = 4 * (u & 1)", "",
              [("qor(qfield(quad(blk, qa + 4 * g, r), sa, 15), "
                "qfield(quad(blk, {qh} + 4 * g, r), u, 1), 4)", "4 * g")], 8),
    QT.Q6_K: ("qa = {qs} + 64 * (u >> 3) + 32 * ((u >> 1) & 1) + 16 * (u & 1)\n"
              "sa = 4 * ((u >> 2) & 1)\nqb = {qh} + 32 * (u >> 3) + 16 * (u & 1)\n"
              "sb = 2 * ((u >> 1) & 3)", "",
              [("qor(qfield(quad(blk, qa + 4 * g, r), sa, 15), "
                "qfield(quad(blk, qb + 4 * g, r), sb, 3), 4)", "4 * g")], 4),
}
#: The GGML types with a gemm_i8 kernel.
I8_TYPES = tuple(_I8_CODE)


def _i8_unit(t: QT, rows: range, cols: list[tuple[str, str]]) -> list[str]:
    """gemm_i8's statements for one unit of a block: for each row i of x and each 16-row
    slice (name suffix, first lane) of W in cols, the unit's integer dot products and their
    scaling into y{i}{suffix}."""
    f = FORMATS[t]
    fields = {"qs": f.qs.offset, "qh": f.qh.offset if f.qh else None}
    pre, per_group, codes, groups = _I8_CODE[t]
    offset = float(f.code_offset) - (128.0 if f.signed_codes else 0.0)
    sums = "at(s{i}, base >> 4)" + (" + at(s{i}, (base >> 4) + 1)" if f.unit == 32 else "")
    unit = []
    for sfx, col in cols:
        def at_col(code: str) -> str:
            return re.sub(r", r\)", f", {col})", code)

        if pre:
            unit.append(at_col(pre.format(**fields)))
        unit.append(at_col(_vector(_SCALE_CODE[t])))
        unit += [f"a{i}_{c} = izero()" for i in rows for c in (0, 1)]
        n = 0
        for g in range(groups):
            if per_group:
                unit.append(at_col(re.sub(r"\bg\b", str(g), per_group.format(**fields))))
            for code, first in codes:
                unit.append("w = " + at_col(re.sub(r"\bg\b", str(g), code.format(**fields))))
                off = eval(first, {"g": g})
                unit += [f"a{i}_{n % 2} = dot4(a{i}_{n % 2}, w, at(q{i}, (base + {off}) >> 2))"
                         for i in rows]
                n += 1
        for i in rows:
            unit.append(f"dd = at(d{i}, base >> 5)\nss = np.float32({sums.format(i=i)})")
            acc = f"(tofloat(a{i}_0) + tofloat(a{i}_1))"
            if offset:
                acc = f"({acc} + np.float32({offset}) * ss)"
            unit.append(f"y{i}{sfx} = fma(a * dd, {acc}, y{i}{sfx})")
            if f.has_bias:
                unit.append(f"y{i}{sfx} = fma(c, dd * ss, y{i}{sfx})")
    return unit


def _i8_blocks(t: QT, unit: list[str]) -> str:
    """A unit's statements over every unit of every block (in _SHARED_UNITS' sets)."""
    f = FORMATS[t]
    n, order = _SHARED_UNITS.get(t, (1, "h"))
    body = "\n".join(_unit_start(f, order, c) + "\n" + "\n".join(unit) for c in range(n))
    return (_BLOCKS + f"    for h in range({f.units_per_block // n}):\n"
            + _indent(body, 8))


def _i8_x_rows(rows: range, ys: list[str]) -> str:
    lines = [f"q{i} = XQ[{_x_row(i)}]\nd{i} = DX[{_x_row(i)}]\ns{i} = XS[{_x_row(i)}]"
             for i in rows]
    return "\n".join(lines + [f"{y} = vzero()" for y in ys])


def _i8_rows(t: QT, mb: int) -> str:
    """The body of gemm_i8 for a block of mb rows of x (as _gemm_rows)."""
    rows = range(mb)
    body = (_i8_x_rows(rows, [f"y{i}" for i in rows]) + "\n"
            + _i8_blocks(t, _i8_unit(t, rows, [("", "r")])) + "\n" + _stores(mb))
    return _indent(body, 16)


# One row of x (decode) and a whole group: its 64 rows in one pass over the blocks, each
# cache line of the weight used up as it arrives. Slice by slice (the loop over r), the
# first slice streams the weight from memory with only a quarter of the work to hide the
# wait under, and the other three run from the caches (BENCHMARKS.md, issue 14's int8
# section). gemm_i8 takes it for every type; gemm_s for the K-quants and Q8_0, where it
# measured faster than the slices with their prefetch (on Q4_1 it was slower).
_WHOLE_GROUP_GEMM_S = (*_SHARED_UNITS, QT.Q8_0)
_WHOLE_GROUP = """    if M == 1 and Rg == {R}:  # one row of x, a whole group: all its rows in one pass
        m0 = 0
        left = 1
{body}
        return
"""


def _i8_decode(t: QT) -> str:
    cols = [(f"_{s}", str(16 * s)) for s in range(R // 16)]
    stores = "\n".join(f"for l in range(16):\n    Y[0, row0 + {16 * s} + l] = lane(y0_{s}, l)"
                        for s in range(R // 16))
    body = (_i8_x_rows(range(1), [f"y0{sfx}" for sfx, _ in cols]) + "\n"
            + _i8_blocks(t, _i8_unit(t, range(1), cols)) + "\n" + stores)
    return _WHOLE_GROUP.format(R=R, body=_indent(body, 8))


def _gemm_decode(t: QT) -> str:
    """gemm_s at one row of x over a whole group in one pass (_WHOLE_GROUP): the statements
    of each unit of _gemm_rows(t, 1) for the four 16-row slices in turn, each slice summing
    as the slice-by-slice loop does (the same bits), each cache line used up as it
    arrives. Its block loop is not _BLOCKS: a next-group prefetch made the one pass slower
    (BENCHMARKS.md)."""
    lines = [line[16:] for line in _gemm_rows(t, 1).splitlines()]
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("    for ") and i > lines.index("for b in range(nb):"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("        "))
    body = "\n".join(lines[start + 1:end])
    slices = [re.sub(r"\by0\b", f"y0_{s}", re.sub(r", r\)", f", {16 * s})", body))
              for s in range(R // 16)]
    stores = "\n".join(f"for l in range(16):\n    Y[0, row0 + {16 * s} + l] = lane(y0_{s}, l)"
                       for s in range(R // 16))
    code = "\n".join(["x0 = X[0]"] + [f"y0_{s} = vzero()" for s in range(R // 16)]
                     + ["for b in range(nb):", "    blk = B[b]", lines[start]] + slices
                     + [stores])
    return _WHOLE_GROUP.format(R=R, body=_indent(code, 8))


_P4 = "uint8[:, :, :, ::1]"
#: kind: (the kernel's arguments after its index, their numba types, fastmath). The launcher
#: takes an int64 array of indices in place of the index and calls the kernel once for each.
KERNELS = {
    "gemv1": ("P, Pt, x, y", f"{_P4}, {_P4}, float32[::1], float32[::1]", True),
    "gemm_s": ("P, Pt, X, Y", f"{_P4}, {_P4}, float32[:, ::1], float32[:, ::1]", False),
    "gemm_i8": ("P, Pt, XQ, DX, XS, Y", f"{_P4}, {_P4}, int32[:, ::1], float32[:, ::1], "
                "int32[:, ::1], float32[:, ::1]", False),
    "deq_t": ("g0, P, Pt, Wt", f"int64, {_P4}, {_P4}, float32[:, ::1]", False),
    "deq_tb": ("g0, P, Pt, Wt", f"int64, {_P4}, {_P4}, uint16[:, ::1]", False),
    "deq_rows": ("ids, P, Pt, out", f"int64[::1], {_P4}, {_P4}, float32[:, ::1]", False),
}


def launcher_name(kind: str, t: QT) -> str:
    return f"run_{kind}_{t.name}"


def launcher_signature(kind: str) -> str:
    return f"void(int64[::1], {KERNELS[kind][1]})"


_LAUNCHER = """
{kind}_{name} = njit(nogil=True, fastmath={fast}, error_model="numpy", cache=True)({kind}_{name})


def {launcher}(index, {args}):
    for j in prange(index.shape[0]):
        {kind}_{name}(index[j], {args})
"""


KINDS = tuple(KERNELS)


def _indent(code: str, n: int) -> str:
    return "\n".join(" " * n + line for line in code.splitlines())


def _dot(terms: list[str]) -> str:
    """A sum of terms as four interleaved partial sums (short dependency chains)."""
    parts = ["(" + " + ".join(terms[i::4]) + ")" for i in range(4)]
    return f"(({parts[0]} + {parts[1]}) + ({parts[2]} + {parts[3]}))"


_HEADER = (
    '"""numba kernels generated by diptych.backends.torch.cpu.kernel_source (do not edit)."""\n'
    "import numpy as np\n"
    "from numba import njit, prange\n"
    "from diptych.backends.torch.cpu.llvm_bits import (bits, bits2, i8, f16, bf16, rint, at,\n"
    "    fma, lane, ld, prefetch, vzero, quad, qfield, qspread, qor, qflip, dot4, izero,\n"
    "    tofloat)\n"
    "C0, C1, C2, C3, C4 = (np.float32(c) for c in {0!r})\n"
).format(tuple(_IQ4_POLY))


def kernel_source(ggml_type) -> str:
    """Python source of the kernels of one GGML type (see the comment above _TEMPLATE)."""
    t = QT(ggml_type)
    f = FORMATS[t]
    qj = _q_at(t, "j")
    qoff = float(f.code_offset)
    qoff_s = f"np.float32({qoff})"
    wval = f"av[r] * ({qj} + {qoff_s})" + (" + cv[r]" if f.has_bias else "")
    val = f"a * ({qj} + {qoff_s})" + (" + c" if f.has_bias else "")
    pre = _Q_CODE[t][0] or "pass"
    units = _UNITS.format(NU=f.units_per_block, U=f.unit, pre12=_indent(pre, 12),
                          scale16=_indent(_SCALE_CODE[t], 16))
    deq = {kind: _DEQ_T.format(kind=kind, name=t.name, group=_GROUP, units=units, R=R,
                               U=f.unit, store=store)
           for kind, store in (("deq_t", wval), ("deq_tb", f"bf16({wval})"))}
    body = _TEMPLATE.format(
        group=_GROUP, units=units, deq_t=deq["deq_t"], deq_tb=deq["deq_tb"],
        name=t.name, U=f.unit, NU=f.units_per_block, QOFF=qoff, R=R, wval=wval,
        val=val, dot=_dot([f"{_q_at(t, j)} * xb[{j}]" for j in range(f.unit)]),
        pre12=_indent(pre, 12),
        scale12=_indent(_SCALE_CODE[t], 12)) + _ROW_BLOCKS.format(
        kind="gemm_s", KIND="ROWS", xargs="X",
        whole=_gemm_decode(t) if t in _WHOLE_GROUP_GEMM_S else "",
        name=t.name, R=R, rows4=_gemm_rows(t, 4), rows2=_gemm_rows(t, 2), rows1=_gemm_rows(t, 1)) + (
        _ROW_BLOCKS.format(kind="gemm_i8", KIND="I8_CODE", xargs="XQ, DX, XS",
                           whole=_i8_decode(t), name=t.name, R=R,
                           rows4=_i8_rows(t, 4),
                           rows2=_i8_rows(t, 2), rows1=_i8_rows(t, 1))
        if t in I8_TYPES else "")
    kinds = [k for k in KINDS if k != "gemm_i8" or t in I8_TYPES]
    return _HEADER + body + "".join(
        _LAUNCHER.format(kind=k, name=t.name, launcher=launcher_name(k, t), args=KERNELS[k][0],
                         fast=KERNELS[k][2])
        for k in kinds)
