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
    gemm_s    small M: each unit of 64 rows is dequantized into an L1-resident fp32 tile
              that every row of x reads (the weight bytes are read once for all M rows)
    deq_t     a range of row groups into a transposed fp32 tile (W[rows].T) for torch.mm,
              dequantize() and the input gradient
    deq_rows  selected rows (embedding lookup)
All four are numba parallel gufuncs over the row groups (kernel_cache.py compiles them).
"""

from __future__ import annotations

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
        return "", "np.rint((((C0 * N + C1) * N + C2) * N + C3) * N + C4)".replace("N", _nibble(f))
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


def _q_at(t: QT, j) -> str:
    """The q expression of a type for element j: an int (folded) or the loop variable name."""
    expr = _Q_CODE[t][1]
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
# (kind, type) as parallel gufuncs over row groups: numba's prange would re-type the whole loop
# body for its parfor lowering (measured 2-3x the compile time, same run time).

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
def gemv1_{name}(gi, P, Pt, x, y, done):
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
    done[0] = 1


def gemm_s_{name}(gi, P, Pt, X, Y, done):
    # Y[:, rows of group gi] = X @ W[rows].T: each unit is dequantized once into an
    # L1-resident fp32 tile ({U} x 64) that every row of X then reads.
{group}    M = X.shape[0]
    acc = np.zeros((M, Rg), np.float32)
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
    w = np.empty(({U}, Rg), np.float32)
{units}                cv[r] = c
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
{group}    col0 = (gi - g0) * {R}
    av = np.empty(Rg, np.float32)
    cv = np.empty(Rg, np.float32)
{units}                cv[r] = c
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

_P4 = "uint8[:, :, :, ::1]"
#: kind: (numba signature, gufunc layout, fastmath)
GUFUNCS = {
    "gemv1": (f"void(int64, {_P4}, {_P4}, float32[::1], float32[::1], int8[:])",
              "(),(a,b,c,d),(e,f,g,h),(k),(n)->()", True),
    "gemm_s": (f"void(int64, {_P4}, {_P4}, float32[:, ::1], float32[:, ::1], int8[:])",
               "(),(a,b,c,d),(e,f,g,h),(m,k),(p,n)->()", True),
    "deq_t": (f"void(int64, int64, {_P4}, {_P4}, float32[:, ::1], int8[:])",
              "(),(),(a,b,c,d),(e,f,g,h),(k,n)->()", False),
    "deq_rows": (f"void(int64, int64, {_P4}, {_P4}, float32[:, ::1], int8[:])",
                 "(),(),(a,b,c,d),(e,f,g,h),(m,k)->()", False),
}
KINDS = tuple(GUFUNCS)


def _indent(code: str, n: int) -> str:
    return "\n".join(" " * n + line for line in code.splitlines())


def _dot(terms: list[str]) -> str:
    """A sum of terms as four interleaved partial sums (short dependency chains)."""
    parts = ["(" + " + ".join(terms[i::4]) + ")" for i in range(4)]
    return f"(({parts[0]} + {parts[1]}) + ({parts[2]} + {parts[3]}))"


_HEADER = (
    '"""numba kernels generated by diptych.backends.torch.cpu.kernel_source (do not edit)."""\n'
    "import numpy as np\n"
    "from diptych.backends.torch.cpu.llvm_bits import bits, bits2, i8, f16\n"
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
    return _HEADER + _TEMPLATE.format(
        group=_GROUP, units=units,
        name=t.name, U=f.unit, NU=f.units_per_block, QOFF=qoff, R=R, wval=wval,
        val=val, dot=_dot([f"{_q_at(t, j)} * xb[{j}]" for j in range(f.unit)]),
        fdot=_dot([f"w[{j}, r] * xb[{j}]" for j in range(f.unit)]), pre12=_indent(pre, 12),
        scale12=_indent(_SCALE_CODE[t], 12))
