"""llama.cpp's CPU arithmetic around a matrix product, reproduced for comparing figures.

ggml's CPU backend does not multiply a weight by fp32 activations: it first converts each
row of activations to the weight type's `vec_dot_type` and multiplies in that form
(ggml-cpu's `ggml_compute_forward_mul_mat`, `type_traits_cpu[type].vec_dot_type`):

- Q4_0, Q5_0, Q8_0 and IQ4_NL weights take q8_0 rows: blocks of 32, scale d = amax / 127
  stored as fp16, codes round(x / d) in int8 (ggml's `quantize_row_q8_0_ref`, which gguf-py's
  Q8_0 quantizer reproduces byte for byte);
- Q4_1 and Q5_1 take q8_1 rows: q8_0's d and codes, plus s = d * sum(codes) rounded to fp16
  on its own; the product takes each weight block's minimum m times that s, not times the
  rounded values' sum;
- K-quants take q8_K rows: blocks of 256, an fp32 scale from the signed value of largest
  magnitude (d = max / -127), codes rounded half to even;
- F16 and BF16 weights take the activations rounded to fp16 / bf16; F32 weights fp32.

q8_0 and q8_1 follow ggml's reference quantizer; its x86 kernels multiply by 127 / amax
instead of dividing by d and round halves to even, which changes a code only where x / d
lies within an ulp of a half.

Integer block sums are exact, so apart from the order of fp32 additions the product equals
the exact weights times the rounded activations (plus, for q8_1, the s correction):
`RoundingQuantLinear` rounds and then runs QuantLinear's own product. What the rounding
does to perplexity is measured in BENCHMARKS.md ("diptych perplexity vs llama-perplexity").
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from diptych.errors import UnsupportedModelError
from diptych.quant import QuantTensor
from diptych.quant.dequant import as_blocks, unpack_q4_1, unpack_q5_1
from diptych.quant.formats import QK_K

from .qlinear import QuantLinear

QK8 = 32  # values per q8_0 / q8_1 block (q8_K: QK_K)

# weight type -> the form ggml's CPU backend gives its activations
VEC_DOT_TYPE = {
    QT.Q4_0: "q8_0", QT.Q5_0: "q8_0", QT.Q8_0: "q8_0", QT.IQ4_NL: "q8_0",
    QT.Q4_1: "q8_1", QT.Q5_1: "q8_1",
    QT.Q2_K: "q8_K", QT.Q3_K: "q8_K", QT.Q4_K: "q8_K", QT.Q5_K: "q8_K", QT.Q6_K: "q8_K",
    QT.F16: "f16", QT.BF16: "bf16", QT.F32: "f32",
}


def _divide(num: float, den: torch.Tensor) -> torch.Tensor:
    """num / den rounded once as C's float division rounds it (torch computes a number over a
    tensor as num * (1 / den), rounded twice), and 0 where den is 0."""
    nz = den != 0
    return torch.where(nz, torch.full_like(den, num) / torch.where(nz, den, 1.0), 0.0)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), exact for every float32 (gguf-py's np_roundf)."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, d, d16) of x (..., K) in blocks of 32: codes float32 (..., K/32, 32) in
    -127..127, the fp32 scale d and the stored fp16 scale (as float32), each (..., K/32, 1)."""
    b = x.reshape(*x.shape[:-1], -1, QK8)
    d = b.abs().amax(-1, keepdim=True) / 127
    return roundf(b * _divide(1, d)), d, d.to(torch.float16).to(torch.float32)


def q8_1_sums(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q8_1's s of each block: d * sum(codes), rounded to fp16 (as float32), (..., K/32)."""
    return (q.sum(-1) * d.squeeze(-1)).to(torch.float16).to(torch.float32)


def q8_K_values(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's q8_K rows hold it, blocks of 256 (`quantize_row_q8_K_ref`)."""
    b = x.reshape(*x.shape[:-1], -1, QK_K)
    peak = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))  # first of largest |x|
    iscale = _divide(-127, peak)
    q = torch.round(iscale * b).clamp_(max=127)                      # nearest_int: ties to even
    return (q * _divide(1, iscale)).reshape(x.shape)


class RoundingQuantLinear(QuantLinear):
    """A QuantLinear whose product takes its input as llama.cpp's CPU backend does (see the
    module docstring). Q4_1/Q5_1 weights also keep their block minimums (N, K/32) fp32."""

    mins: torch.Tensor | None = None

    @classmethod
    def from_quant_tensor(cls, qt: QuantTensor) -> "RoundingQuantLinear":
        t = QT(qt.ggml_type)
        if t not in VEC_DOT_TYPE:
            raise UnsupportedModelError(
                f"{qt.name}: llama.cpp's rounding is reproduced for "
                + ", ".join(x.name for x in VEC_DOT_TYPE) + f", not {t.name}")
        w = super().from_quant_tensor(qt)
        if VEC_DOT_TYPE[t] == "q8_1":
            n, k = w.shape
            blocks = as_blocks(np.asarray(qt.data).reshape(-1), t)
            m = (unpack_q4_1 if t == QT.Q4_1 else unpack_q5_1)(blocks)[1]
            w.mins = torch.from_numpy(np.ascontiguousarray(m, np.float32).reshape(n, k // QK8))
        return w

    @classmethod
    def from_parts(cls, name: str, parts: list[QuantTensor]) -> "RoundingQuantLinear":
        return cls.from_quant_tensor(QuantTensor.stack_rows(name, parts))  # the minimums' rows

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        kind = VEC_DOT_TYPE[self.ggml_type]
        if kind == "f32" or x.shape[0] == 0:
            return super()._forward(x)
        if kind in ("f16", "bf16"):
            dt = torch.float16 if kind == "f16" else torch.bfloat16
            return super()._forward(x.to(dt).to(torch.float32))
        if kind == "q8_K":
            return super()._forward(q8_K_values(x).contiguous())
        q, d, d16 = q8_0(x)
        y = super()._forward((q * d16).reshape(x.shape).contiguous())
        if kind == "q8_1":
            # ggml adds m * s per block; the product above added m * d16 * sum(codes)
            y += (q8_1_sums(q, d) - d16.squeeze(-1) * q.sum(-1)) @ self.mins.T
        return y
