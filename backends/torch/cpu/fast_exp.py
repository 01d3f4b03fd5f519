"""The float flags the CPU's small kernels share, and exp(x) for x <= 0 in float32 as a
polynomial LLVM vectorizes: numba has no vector exp without Intel's SVML, and its scalar
libm call keeps a loop from vectorizing."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .cached_njit import cached_njit

# The float flags of the CPU's small kernels (decode attention, decode ops, this exp):
# reassociation and contraction let LLVM vectorize the sums; no "ninf"/"nnan", because
# masked attention scores are -inf.
FAST_MATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _pow2(typingctx, n):
    """2.0 ** n as float32 for a whole float32 n in [-126, 127] (built from its exponent
    bits: vectorizes, where ldexp is a library call)."""
    if n != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        e = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(n), codegen


@cached_njit(fastmath=FAST_MATH, inline="always")
def exp_nonpositive(x):
    """exp(x) for x <= 0 in float32, within 3 ulp; 0 below -87 (and for -inf)."""
    # branch-free (a select at the end), so that loops over it vectorize
    xc = max(x, np.float32(-87.0))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    f = xc - n * np.float32(0.693145751953125) - n * np.float32(1.4286068203094173e-06)
    p = np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    return p * _pow2(n) if x >= np.float32(-87.0) else np.float32(0.0)
