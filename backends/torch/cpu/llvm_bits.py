"""numba intrinsics for the generated CPU kernels: integer bit fields -> float32 in 32-bit ops,
and 16-lane vectors for the kernels that hold their accumulators in registers.

numba types uint8 & int as int64, which makes LLVM vectorize with 8 lanes and vcvtqq2ps;
these emit 32-bit integer ops that vectorize to 16 lanes. The generated kernel source
(kernel_source.py) imports them by this module's path.

Vectors: `F32X16` (16 float32), `U8X16` (16 bytes) and `I32X16` are numba types held in one LLVM
vector (a zmm register on AVX-512, two ymm on AVX2). `ld` reads 16 rows' copies of one block
byte (repack.py's layout); `bits`, `bits2`, `i8` and `f16` decode them lane by lane exactly as
they decode a scalar byte; `+ - *`, unary minus and `rint` work on vectors and on a vector
with a float scalar (broadcast), without fast-math flags, so every lane rounds as the scalar
reference does. `fma` multiplies and adds with one rounding; `at` reads one float of x, which
`fma` broadcasts and LLVM folds into the instruction's memory operand. Code written with them
stays vectorized whatever LLVM's loop vectorizer decides (it declined the multi-row loops: too
many runtime alias checks between the accumulators, x and the weight bytes).

`bf16` gives a float32's bfloat16 bits, rounded as torch rounds (the bf16 tiles of deq_tb);
`prefetch` asks for a cache line of a weight's bytes into L2 ahead of its use.

Integer dot products (the int8-activation kernel, AVX-512 VNNI only): `quad` reads four
consecutive byte planes for 16 rows as an I32X16 whose lane holds one row's 4 bytes;
`qfield`, `qspread`, `qor` and `qflip` decode the codes of all 64 bytes at once (bit fields that stay
inside their byte); `dot4` multiplies them, as unsigned bytes, by 4 signed bytes of x
broadcast, and adds each lane's 4 products to its int32 accumulator (vpdpbusd); `tofloat`
converts the accumulators.
"""

from __future__ import annotations

import operator

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.extending import intrinsic, models, register_model

__all__ = ["bits", "bits2", "i8", "f16", "bf16", "rint", "F32X16", "U8X16", "I32X16", "ld", "at",
           "prefetch", "vzero", "fma", "lane", "quad", "qfield", "qspread", "qor", "qflip",
           "dot4", "izero", "tofloat"]

LANES = 16
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


class _Vector(types.Type):
    def __init__(self, name: str, element: ir.Type):
        self.llvm_type = ir.VectorType(element, LANES)
        super().__init__(name=name)


F32X16 = _Vector("f32x16", _F32)
U8X16 = _Vector("u8x16", ir.IntType(8))
I32X16 = _Vector("i32x16", _I32)


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


def _splat(builder, v, vty: ir.VectorType):
    """v broadcast to every lane of vty."""
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vty.count),
                                                          [0] * vty.count))


def _to_i32(context, builder, val, ty):
    v = context.cast(builder, val, ty, types.int64) if ty != types.int64 else val
    return builder.trunc(v, _I32)


def _zext32(builder, v):
    """An unsigned integer (or a vector of them) widened or narrowed to 32 bits per lane."""
    vec = isinstance(v.type, ir.VectorType)
    w = (v.type.element if vec else v.type).width
    to = ir.VectorType(_I32, v.type.count) if vec else _I32
    if w < 32:
        return builder.zext(v, to)
    if w > 32:
        return builder.trunc(v, to)
    return v


def _is_byte(t) -> bool:
    """An unsigned integer scalar or a U8X16 vector (bits and bits2 decode both)."""
    return t == U8X16 or (isinstance(t, types.Integer) and not t.signed)


def _lanes(builder, x, v):
    """A 32-bit scalar v matched to x: broadcast when x is a vector."""
    return _splat(builder, v, x.type) if isinstance(x.type, ir.VectorType) else v


def _float_of(x):
    return ir.VectorType(_F32, x.type.count) if isinstance(x.type, ir.VectorType) else _F32


def _field(context, builder, sig, args, i):
    """(x >> shift) & mask for the byte(s) args[i] and the scalar shift, mask after it."""
    x = _zext32(builder, args[i])
    sh = _lanes(builder, x, _to_i32(context, builder, args[i + 1], sig.args[i + 1]))
    mk = _lanes(builder, x, _to_i32(context, builder, args[i + 2], sig.args[i + 2]))
    return builder.and_(builder.lshr(x, sh), mk)


@intrinsic
def bits(typingctx, v, shift, mask):
    """float32((v >> shift) & mask) for an unsigned integer v (per lane for a U8X16)."""
    if not _is_byte(v):
        return None
    if not (isinstance(shift, types.Integer) and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x = _field(context, builder, sig, args, 0)
        return builder.sitofp(x, _float_of(x))

    return (F32X16 if v == U8X16 else types.float32)(v, shift, mask), codegen


@intrinsic
def bits2(typingctx, a, ash, amask, b, bsh, bmask, bls):
    """float32(((a >> ash) & amask) | (((b >> bsh) & bmask) << bls)) for unsigned a, b (per
    lane for U8X16s)."""
    if not (_is_byte(a) and _is_byte(b) and (a == U8X16) == (b == U8X16)):
        return None

    def codegen(context, builder, sig, args):
        x = _field(context, builder, sig, args, 0)
        y = _field(context, builder, sig, args, 3)
        y = builder.shl(y, _lanes(builder, y, _to_i32(context, builder, args[6], sig.args[6])))
        return builder.sitofp(builder.or_(x, y), _float_of(x))

    return (F32X16 if a == U8X16 else types.float32)(a, ash, amask, b, bsh, bmask, bls), codegen


@intrinsic
def i8(typingctx, v):
    """float32 of a uint8 byte read as int8 (per lane for a U8X16)."""
    if v not in (types.uint8, U8X16):
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _float_of(args[0]))  # i8 in LLVM is sign-agnostic

    return (F32X16 if v == U8X16 else types.float32)(v), codegen


@intrinsic
def f16(typingctx, lo, hi):
    """float32 of the IEEE half whose little-endian bytes are (lo, hi). Exact (subnormals too;
    per lane for U8X16s)."""
    if not (lo == hi and lo in (types.uint8, U8X16)):
        return None

    def codegen(context, builder, sig, args):
        vec = lo == U8X16
        i16 = ir.VectorType(ir.IntType(16), LANES) if vec else ir.IntType(16)
        half = ir.VectorType(ir.HalfType(), LANES) if vec else ir.HalfType()
        eight = ir.Constant(ir.IntType(16), 8)
        eight = _splat(builder, eight, i16) if vec else eight
        h = builder.or_(builder.zext(args[0], i16), builder.shl(builder.zext(args[1], i16), eight))
        return builder.fpext(builder.bitcast(h, half), _float_of(h))

    return (F32X16 if lo == U8X16 else types.float32)(lo, hi), codegen


@intrinsic
def ld(typingctx, arr, row, col):
    """The 16 bytes arr[row, col:col + 16] of a 2-D uint8 array whose rows are contiguous (a
    block's byte planes, repack.py), as a U8X16. No bounds check: the caller keeps
    col + 16 within the row."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        stride0 = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        off = builder.add(builder.mul(context.cast(builder, args[1], sig.args[1], types.intp),
                                      stride0),
                          context.cast(builder, args[2], sig.args[2], types.intp))
        p = builder.gep(a.data, [off])
        return builder.load(builder.bitcast(p, U8X16.llvm_type.as_pointer()), align=1)

    return U8X16(arr, row, col), codegen


@intrinsic
def prefetch(typingctx, arr, row):
    """Fetch the cache line at arr[row, 0] of a 2-D uint8 array into L2 (prefetcht1);
    nothing else happens."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        stride0 = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        off = builder.mul(context.cast(builder, args[1], sig.args[1], types.intp), stride0)
        p = builder.gep(a.data, [off])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32]),
            "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(arr, row), codegen


@intrinsic
def at(typingctx, arr, i):
    """arr[i] of a contiguous 1-D float32 or int32 array, for 0 <= i < len(arr) (numba's
    indexing adds a compare and a select per access to wrap negative indices)."""
    if not (isinstance(arr, types.Array) and arr.dtype in (types.float32, types.int32)
            and arr.ndim == 1 and arr.layout == "C" and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load(builder.gep(a.data, [context.cast(builder, args[1], sig.args[1],
                                                              types.intp)]))

    return arr.dtype(arr, i), codegen


@intrinsic
def vzero(typingctx):
    """An F32X16 of +0.0."""
    def codegen(context, builder, sig, args):
        return ir.Constant(F32X16.llvm_type, [0.0] * LANES)

    return F32X16(), codegen


def _vector_args(context, builder, sig, args):
    """Each argument as an F32X16 value (float scalars converted to float32, broadcast)."""
    out = []
    for v, t in zip(args, sig.args):
        if t != F32X16:
            v = _splat(builder, context.cast(builder, v, t, types.float32), F32X16.llvm_type)
        out.append(v)
    return out


def _operands_ok(*ts) -> bool:
    """At least one F32X16, the others F32X16 or float scalars."""
    return (any(t == F32X16 for t in ts)
            and all(t == F32X16 or isinstance(t, types.Float) for t in ts))


def _llvm_intrinsic(builder, name: str, args):
    ty = F32X16.llvm_type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * len(args)),
                                        f"llvm.{name}.v{LANES}f32")
    return builder.call(fn, args)


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c, rounded once, per lane; scalars are broadcast."""
    if not _operands_ok(a, b, c):
        return None

    def codegen(context, builder, sig, args):
        return _llvm_intrinsic(builder, "fma", _vector_args(context, builder, sig, args))

    return F32X16(a, b, c), codegen


@intrinsic
def lane(typingctx, v, i):
    """Lane i of an F32X16, as a float32."""
    if v != F32X16 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], _to_i32(context, builder, args[1], sig.args[1]))

    return types.float32(v, i), codegen


# Arithmetic on vectors is lowered inline (numba's low-level API): an @overload would compile
# each operator as a function of its own, which took most of the kernels' compile time.
_BINARY = {operator.add: "fadd", operator.sub: "fsub", operator.mul: "fmul"}


def _binary_typer(op):
    @infer_global(op)
    class _Template(AbstractTemplate):
        def generic(self, args, kws):
            if len(args) == 2 and not kws and _operands_ok(*args):
                return signature(F32X16, *args)


def _binary_lowering(op, name):
    def lower(context, builder, sig, args):
        return getattr(builder, name)(*_vector_args(context, builder, sig, args))

    for pair in ((F32X16, F32X16), (F32X16, types.Float), (types.Float, F32X16)):
        lower_builtin(op, *pair)(lower)


for _op, _name in _BINARY.items():
    _binary_typer(_op)
    _binary_lowering(_op, _name)


@infer_global(operator.neg)
class _NegTemplate(AbstractTemplate):
    def generic(self, args, kws):
        if len(args) == 1 and not kws and args[0] == F32X16:
            return signature(F32X16, F32X16)


@lower_builtin(operator.neg, F32X16)
def _neg(context, builder, sig, args):
    return builder.fneg(args[0])


@intrinsic
def rint(typingctx, a):
    """Round to the nearest integer, ties to even (np.rint), of a float32 or per lane."""
    if a not in (types.float32, F32X16):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        suffix = f"v{LANES}f32" if a == F32X16 else "f32"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty]),
                                            f"llvm.rint.{suffix}")
        return builder.call(fn, list(args))

    return a(a), codegen


@intrinsic
def bf16(typingctx, a):
    """A float32's bfloat16 bits as uint16: rounded to nearest, ties to even, a NaN as
    0x7FC0 (torch's float -> bfloat16 conversion, so that tiles written here multiply as a
    torch-converted copy would)."""
    if a != types.float32:
        return None

    def codegen(context, builder, sig, args):
        u = builder.bitcast(args[0], _I32)
        odd = builder.and_(builder.lshr(u, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        rounded = builder.add(u, builder.add(odd, ir.Constant(_I32, 0x7FFF)))
        high = builder.trunc(builder.lshr(rounded, ir.Constant(_I32, 16)), ir.IntType(16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(nan, ir.Constant(ir.IntType(16), 0x7FC0), high)

    return types.uint16(a), codegen


# --- integer dot products (AVX-512 VNNI) ---------------------------------------------------
@intrinsic
def quad(typingctx, arr, row, col):
    """Bytes arr[row:row + 4, col:col + 16] of a 2-D uint8 array with contiguous rows, as
    16 lanes of 4 bytes: lane l holds arr[row + i, col + l] in its byte i. No bounds check."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        stride0 = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        row = context.cast(builder, args[1], sig.args[1], types.intp)
        col = context.cast(builder, args[2], sig.args[2], types.intp)
        planes = []
        for i in range(4):
            off = builder.add(builder.mul(builder.add(row, ir.Constant(row.type, i)), stride0),
                              col)
            p = builder.bitcast(builder.gep(a.data, [off]), U8X16.llvm_type.as_pointer())
            planes.append(builder.load(p, align=1))

        def mask(n, order):
            return ir.Constant(ir.VectorType(_I32, n), order)

        lo = builder.shuffle_vector(planes[0], planes[1], mask(32, list(range(32))))
        hi = builder.shuffle_vector(planes[2], planes[3], mask(32, list(range(32))))
        v = builder.shuffle_vector(lo, hi, mask(64, [16 * i + l for l in range(LANES)
                                                     for i in range(4)]))
        return builder.bitcast(v, I32X16.llvm_type)

    return I32X16(arr, row, col), codegen


def _int_splat(builder, value: int):
    return ir.Constant(I32X16.llvm_type, [value] * LANES)


@intrinsic
def qfield(typingctx, v, shift, mask):
    """(b >> shift) & mask for every byte b of an I32X16, for bit fields inside a byte
    (mask < 2 ** (8 - shift))."""
    if v != I32X16 or not (isinstance(shift, types.Integer) and isinstance(mask, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        sh = _splat(builder, _to_i32(context, builder, args[1], sig.args[1]), v.llvm_type)
        mk = _to_i32(context, builder, args[2], sig.args[2])
        mk = builder.mul(mk, ir.Constant(_I32, 0x01010101))
        return builder.and_(builder.lshr(args[0], sh), _splat(builder, mk, v.llvm_type))

    return I32X16(v, shift, mask), codegen


@intrinsic
def qspread(typingctx, h, shift):
    """Bit i of (h >> shift) into bit 0 of byte i, i < 4, per lane of an I32X16 (Q5's fifth
    bits: the multiply puts bit i at bits i + 7j, which no other (i, j) reaches, and the
    mask keeps j = i)."""
    if h != I32X16 or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        sh = _splat(builder, _to_i32(context, builder, args[1], sig.args[1]), h.llvm_type)
        v = builder.and_(builder.lshr(args[0], sh), _int_splat(builder, 0xF))
        v = builder.mul(v, _int_splat(builder, 0x00204081))
        return builder.and_(v, _int_splat(builder, 0x01010101))

    return I32X16(h, shift), codegen


@intrinsic
def qor(typingctx, a, b, shl):
    """a | (b << shl) for I32X16s whose shifted bytes stay inside their byte."""
    if not (a == b == I32X16 and isinstance(shl, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        sh = _splat(builder, _to_i32(context, builder, args[2], sig.args[2]), a.llvm_type)
        return builder.or_(args[0], builder.shl(args[1], sh))

    return I32X16(a, b, shl), codegen


@intrinsic
def qflip(typingctx, v):
    """Each byte b of an I32X16 as b ^ 0x80: an int8 code read as unsigned is code + 128."""
    if v != I32X16:
        return None

    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _int_splat(builder, -0x7F7F7F80))  # 0x80808080

    return I32X16(v), codegen


@intrinsic
def dot4(typingctx, acc, w, x4):
    """acc + (the 4 unsigned bytes of each lane of w) . (the 4 signed bytes of the int32 x4),
    per lane (vpdpbusd: exact, no saturation)."""
    if not (acc == w == I32X16 and isinstance(x4, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ty = I32X16.llvm_type
        # the <16 x i32> operand form; newer LLVMs upgrade it to their <64 x i8> one
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        x = _splat(builder, _to_i32(context, builder, args[2], sig.args[2]), ty)
        return builder.call(fn, [args[0], args[1], x])

    return I32X16(acc, w, x4), codegen


@intrinsic
def izero(typingctx):
    """An I32X16 of zeros."""
    def codegen(context, builder, sig, args):
        return _int_splat(builder, 0)

    return I32X16(), codegen


@intrinsic
def tofloat(typingctx, v):
    """An I32X16 converted to F32X16 (exact below 2 ** 24)."""
    if v != I32X16:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], F32X16.llvm_type)

    return F32X16(v), codegen
