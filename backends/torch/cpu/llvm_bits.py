"""numba intrinsics for the generated CPU kernels: integer bit fields -> float32 in 32-bit ops.

numba types uint8 & int as int64, which makes LLVM vectorize with 8 lanes and vcvtqq2ps;
these emit 32-bit integer ops that vectorize to 16 lanes. The generated kernel source
(kernel_source.py) imports them by this module's path.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = ["bits", "bits2", "i8", "f16"]


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
def bits(typingctx, v, shift, mask):
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
def bits2(typingctx, a, ash, amask, b, bsh, bmask, bls):
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
def i8(typingctx, v):
    """float32 of a uint8 byte read as int8."""
    if v != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], ir.FloatType())  # i8 in LLVM is sign-agnostic

    return types.float32(v), codegen


@intrinsic
def f16(typingctx, lo, hi):
    """float32 of the IEEE half whose little-endian bytes are (lo, hi). Exact (subnormals too)."""
    if lo != types.uint8 or hi != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        i16 = ir.IntType(16)
        h = builder.or_(builder.zext(args[0], i16), builder.shl(builder.zext(args[1], i16),
                                                                 ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return types.float32(lo, hi), codegen
