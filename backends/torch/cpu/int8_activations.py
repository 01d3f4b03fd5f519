"""Activations as 8-bit integers for the integer-dot kernels (gemm_i8, kernel_source.py).

Each row of x is cut into blocks of 32 values; a block is stored as int8 codes q and one
float32 scale d = max|x| / 127 with x ~ d * q (q = rint(x * 127 / max|x|)), as llama.cpp's
Q8_0 does but with a float32 scale. The kernels multiply the weights' integer codes by q
exactly in int32 (VNNI's vpdpbusd) and scale once per unit of 16 or 32 weights; the sums of
q per 16 values carry the weights' offsets and minimums.

The error this adds is that of rounding x to 8 bits, well inside the real-model agreement
bars (tests/real). Every width of a step takes it, except on a CPU with AMX the steps from
qlinear._I8_BF16_TILES_FROM rows ("tiles_bf16"). It is used only where it pays and cannot
hurt: CPUs with AVX-512 VNNI, inference steps (`torch.is_inference_mode_enabled()`:
training keeps fp32 in every pass), and not when DIPTYCH_CPU_INT8=0.
"""

from __future__ import annotations


import numba
import numpy as np

from .cached_njit import cached_njit
from .step_tape import run
from .switches import switched_on

BLOCK = 32  # values of x per scale
SUM_SPAN = 16  # values of x per stored code sum (the smallest weight unit)


def cpu_supports() -> bool:
    """Whether the CPU numba compiles for has AVX-512 VNNI (NUMBA_CPU_FEATURES when set,
    else the host's)."""
    feats = numba.config.CPU_FEATURES
    if feats:
        on = {f[1:] for f in feats.split(",") if f.startswith("+")}
        return {"avx512vnni", "avx512bw"} <= on
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return False  # a named CPU without a feature list: assume the baseline
    from llvmlite import binding

    host = binding.get_host_cpu_features()
    return bool(host.get("avx512vnni")) and bool(host.get("avx512bw"))


#: Whether this CPU runs the int8 kernels.
SUPPORTED = cpu_supports()
#: Whether the quantized linears use them (set once at import; DIPTYCH_CPU_INT8=0 turns
#: them off, the fp32 kernels then serve every step).
ENABLED = SUPPORTED and switched_on("DIPTYCH_CPU_INT8")


@cached_njit(error_model="numpy")
def _quantize(x, q, d, s):
    for m in range(x.shape[0]):
        xm, qm = x[m], q[m]
        for b in range(x.shape[1] // BLOCK):
            base = b * BLOCK
            amax = np.float32(0.0)
            for j in range(BLOCK):
                amax = max(amax, abs(xm[base + j]))
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            d[m, b] = amax / np.float32(127.0)
            for h in range(BLOCK // SUM_SPAN):
                t = 0
                for j in range(base + h * SUM_SPAN, base + (h + 1) * SUM_SPAN):
                    v = np.int32(np.rint(xm[j] * inv))
                    qm[j] = v
                    t += v
                s[m, base // SUM_SPAN + h] = t


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, d, s) of x (M, K) float32 C-contiguous, K a multiple of 32: q (M, K) int8 codes,
    d (M, K/32) float32 scales, s (M, K/16) int32 sums of q per 16 values."""
    m, k = x.shape
    q = np.empty((m, k), np.int8)
    d = np.empty((m, k // BLOCK), np.float32)
    s = np.empty((m, k // SUM_SPAN), np.int32)
    run(_quantize, x, q, d, s, reads=(x,), writes=(q, d, s))
    return q, d, s
