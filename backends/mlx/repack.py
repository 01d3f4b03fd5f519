"""GGUF blocks -> MLX affine quantization (`mx.quantized_matmul`, group 32), once at load.

MLX's affine format stores, per group of 32 consecutive elements of a row, a scale and a
bias, and the integer codes packed LSB-first as one continuous bit stream in uint32 words
(for 5 bits: 32 codes = 160 bits = 5 words, a code may straddle two words); a value is
``scale * code + bias``. `pack_codes` writes that layout; the tests check it against
`mx.quantize` for every bit width.

How each GGUF type maps (element e of a row; d, m, dmin fp16 fields; sc, mn sub-block ints):

    Q4_0   4-bit  scale d         bias -8d          code q           exact
    Q4_1   4-bit  scale d         bias m            code q           exact
    Q5_0   5-bit  scale d         bias -16d         code q           exact
    Q5_1   5-bit  scale d         bias m            code q           exact
    Q8_0   8-bit  scale d         bias -128d        code q + 128     exact
    Q4_K   4-bit  scale d*sc_j    bias -dmin*mn_j   code q           exact (group j = e // 32)
    Q5_K   5-bit  scale d*sc_j    bias -dmin*mn_j   code q           exact
    IQ4_NL 8-bit  scale d         bias -128d        code V[i] + 128  exact (V: the codebook)
    Q6_K   8-bit  requantized, see below (16-element groups)
    Q3_K   6-bit  requantized
    Q2_K   5-bit  requantized
    F32/F16/BF16  a dense mx.array, used as x @ w.T

"exact" means: with float32 scales and biases (the CPU default), `mx.dequantize` of the
repacked tensor is bit-identical (0 ulp) to the numpy reference dequantizer (quant.dequant):
scale*code is exact in float32 (at most 11+6+5 = 22 significant bits for the K-quants,
11+8 for Q8_0/IQ4_NL), so the one rounding left is the final add, the same one the
reference makes. With float16 scales (the Metal default) the legacy types' d, m, -8d, -16d,
-128d stay exact (fp16 numbers times powers of two), while the K-quants' d*sc_j and
dmin*mn_j round to 11 bits; bfloat16 rounds to 8 bits. Whether a tensor's half-precision
scales and biases are exact is checked on the data (`MLXWeight.exact`); a tensor whose
scales would overflow the half type (|d| > 8188 for Q4_0, > 511 for Q8_0) keeps float32
scales. `measure_error` measures all of this against the reference. Note that MLX's CPU
build also *computes* in the scale dtype (fp16 scales: fp16 dequantize arithmetic).

Q6_K, Q3_K and Q2_K have 16-element sub-blocks, each with its own scale (x = s*q + c with
q in [qlo, qhi]); MLX's smallest affine group is 32. Each group of 32 (two sub-blocks) is
requantized on an *anchored* grid: step = |s_big| / M, with s_big the larger of the two
sub-block scales and M the largest power of two with M*(qhi - qlo) <= 2^bits - 1, and the
origin at the big sub-block's smallest value. The big sub-block is then represented
exactly (its values are origin + step * M*(q - qlo)); the other sub-block's values round to
that grid, an error of at most step/2 = |s_big| / (2M) — and none where M*s_small/s_big is
an integer (equal scales, for example). Where the other sub-block does not fit the code
range (Q2_K's separate mins; or opposite-sign scales of equal size hitting both code ends),
the group falls back to min/max requantization over its 32 values, error <= range/(2L),
L = 2^bits - 1 (for Q6_K/Q3_K within 0.5% of the anchored bound). Bounds relative to
|s_big|, the coarser sub-block's own quantization step: Q6_K 8-bit M=4: 1/8; Q3_K 6-bit
M=8: 1/16; Q2_K 5-bit M=8: 1/16 (or its range bound). Measured on Qwen2.5-0.5B's Q6_K
ffn_down: RMS error 0.4% of RMS w (Q6_K's own rounding is ~3%); logits KL 2e-5 nats.

Everything works in row chunks (`CHUNK_ELEMENTS` at a time): no whole-tensor float
expansion; the requantized types dequantize only one chunk of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType

from diptych.errors import UnsupportedModelError
from diptych.quant import QuantTensor
from diptych.quant import dequant as dq
from diptych.quant.formats import FORMATS

T = GGMLQuantizationType
GROUP = 32
CHUNK_ELEMENTS = 1 << 20  # elements of a row chunk: bounds the temporaries to a few MB

#: bits of the exact mappings: the code bits, or 8 for codes shifted to unsigned (Q8_0) and
#: codebook values (IQ4_NL)
EXACT_BITS = {t: FORMATS[t].code_bits for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K)}
EXACT_BITS |= {T.Q8_0: 8, T.IQ4_NL: 8}
#: default bits of the requantized 16-element-group types
REQUANT_BITS = {T.Q6_K: 8, T.Q3_K: 6, T.Q2_K: 5}
DENSE_TYPES = (T.F32, T.F16, T.BF16)

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mx_dtype(dtype) -> mx.Dtype:
    """'float32' | 'float16' | 'bfloat16' | an mx.Dtype -> mx.Dtype."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return _MX_DTYPES[str(dtype).removeprefix("mlx.core.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16") from None


def dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "fp32", mx.float16: "fp16", mx.bfloat16: "bf16"}.get(dtype, str(dtype))


@dataclass
class MLXWeight:
    """A prepared 2-D weight (out, in): affine-quantized for mx.quantized_matmul, or dense."""

    source: str                       # the GGUF type name
    shape: tuple[int, int]
    w: mx.array                       # packed uint32 (out, in*bits/32), or dense (out, in)
    scales: mx.array | None = None    # (out, in/32)
    biases: mx.array | None = None
    bits: int = 0                     # 0: dense
    group_size: int = GROUP
    exact: bool = True                # stores the reference values exactly (scales included)
    note: str = field(default="", repr=False)

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.w, self.scales, self.biases) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def layout(self) -> str:
        if not self.quantized:
            return f"{self.source} -> dense {dtype_name(self.w.dtype)}, x @ w.T"
        how = "; ".join(x for x in ("exact" if self.exact else "", self.note) if x)
        return (f"{self.source} -> affine {self.bits}-bit g{self.group_size}, "
                f"{dtype_name(self.scales.dtype)} scale+bias ({how})")

    def dequantize(self, dtype=mx.float32) -> mx.array:
        """The whole matrix as floats (for tests and small weights only)."""
        if not self.quantized:
            return self.w.astype(dtype)
        return mx.dequantize(self.w, self.scales, self.biases, group_size=self.group_size,
                             bits=self.bits, dtype=dtype)


# -- packing -----------------------------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (rows, n) in 0..2^bits-1, n a multiple of 32 -> MLX's packed uint32
    (rows, n*bits/32): a little-endian bit stream, code i at bits [i*bits, (i+1)*bits)."""
    rows, n = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        c = codes.astype(np.uint32).reshape(rows, -1, 8)
        v = c[:, :, 0].copy()
        for i in range(1, 8):
            v |= c[:, :, i] << np.uint32(4 * i)
        return v
    # general: 8 codes -> one uint64 of 8*bits <= 64 bits -> its low `bits` bytes
    c = codes.astype(np.uint64).reshape(rows, -1, 8)
    v = c[:, :, 0].copy()
    for i in range(1, 8):
        v |= c[:, :, i] << np.uint64(bits * i)
    b = v.astype("<u8", copy=False).view(np.uint8).reshape(rows, -1, 8)[:, :, :bits]
    return np.ascontiguousarray(b).reshape(rows, -1).view(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_codes` -> uint8 (rows, n)."""
    rows = packed.shape[0]
    bitstream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=1,
                              bitorder="little").reshape(rows, -1, bits)
    return (bitstream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(
        axis=2, dtype=np.uint8)


# -- exact mappings: blocks of a row chunk -> (codes, scale, bias) ------------------------

def _exact_fields(ggml_type, blocks):
    """Blocks (n, type_size) -> codes uint8 (n, block_size), scale and bias float32
    (n, block_size/32): one (scale, bias) per group of 32 codes."""
    offset = np.float32(FORMATS[ggml_type].code_offset)
    if ggml_type == T.Q4_0:
        d, q = dq.unpack_q4_0(blocks)
        return q, d, d * offset
    if ggml_type == T.Q4_1:
        d, m, q = dq.unpack_q4_1(blocks)
        return q, d, m
    if ggml_type == T.Q5_0:
        d, q = dq.unpack_q5_0(blocks)
        return q, d, d * offset
    if ggml_type == T.Q5_1:
        d, m, q = dq.unpack_q5_1(blocks)
        return q, d, m
    if ggml_type == T.Q8_0:
        d, q = dq.unpack_q8_0(blocks)
        return (q.view(np.uint8) ^ np.uint8(0x80)), d, d * np.float32(-128)
    if ggml_type == T.IQ4_NL:
        d, idx = dq.unpack_iq4_nl(blocks)
        codes = (FORMATS[T.IQ4_NL].codebook.astype(np.int16) + 128).astype(np.uint8)[idx]
        return codes, d, d * np.float32(-128)
    if ggml_type in (T.Q4_K, T.Q5_K):
        unpack = dq.unpack_q4_k if ggml_type == T.Q4_K else dq.unpack_q5_k
        d, dmin, sc, mn, q = unpack(blocks)
        return q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    raise AssertionError(ggml_type)


# -- requantized 16-element-group types --------------------------------------------------

def _subgroup_affine(ggml_type, blocks):
    """Blocks -> per 16-element sub-block (s, c) float32 (n, 16) and the code range, where
    the reference value is s*q + c (c = 0 except for Q2_K's mins)."""
    fmt = FORMATS[ggml_type]
    qlo, qhi = fmt.code_offset, fmt.code_offset + (1 << fmt.code_bits) - 1
    if ggml_type == T.Q6_K:
        d, sc, _ = dq.unpack_q6_k(blocks)
        s = d * sc.astype(np.float32)
        return s, np.zeros_like(s), qlo, qhi
    if ggml_type == T.Q3_K:
        d, sc, _ = dq.unpack_q3_k(blocks)
        s = d * sc.astype(np.float32)
        return s, np.zeros_like(s), qlo, qhi
    if ggml_type == T.Q2_K:
        d, dmin, sc, mn, _ = dq.unpack_q2_k(blocks)
        return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), qlo, qhi
    raise AssertionError(ggml_type)


def _round_to(values: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """float32 values rounded to `dtype` (as MLX rounds) and back to float32."""
    if dtype == mx.float32:
        return values
    return np.array(mx.array(values).astype(dtype).astype(mx.float32))


def _requant_fields(ggml_type, blocks, bits, scale_dtype):
    """Blocks of a 16-group type -> (codes, scale, bias) per group of 32 on the anchored
    grid (module docstring); codes are chosen against the scale/bias as stored."""
    x = dq.dequantize_blocks(blocks, ggml_type).reshape(-1, 2, 16)    # (G, 2, 16), exact
    s, c, qlo, qhi = _subgroup_affine(ggml_type, blocks)
    s, c = s.reshape(-1, 2), c.reshape(-1, 2)                            # (G, 2)
    levels = (1 << bits) - 1
    mult = 1 << int(np.floor(np.log2(levels // (qhi - qlo))))
    big = np.argmax(np.abs(s), axis=1)
    rows = np.arange(len(s))
    s_big, c_big = s[rows, big], c[rows, big]
    step = np.abs(s_big) / np.float32(mult)
    origin = np.where(s_big > 0, s_big * np.float32(qlo), s_big * np.float32(qhi)) + c_big
    xf = x.reshape(-1, 32).astype(np.float64)
    ok = step > 0
    safe = np.where(ok, step, 1).astype(np.float64)
    u = np.rint((xf - origin[:, None]) / safe[:, None])
    lo, hi = u.min(axis=1), u.max(axis=1)
    shift = np.where(hi > levels, hi - levels, np.minimum(lo, 0))
    ok &= (hi - lo) <= levels
    origin = np.where(shift != 0, origin + shift * step, origin).astype(np.float32)
    # fallback: min/max over the 32 values (Q2_K mins out of range, or zero scales)
    mn, mx_ = x.reshape(-1, 32).min(axis=1), x.reshape(-1, 32).max(axis=1)
    step = np.where(ok, step, (mx_ - mn) / np.float32(levels)).astype(np.float32)
    origin = np.where(ok, origin, mn).astype(np.float32)
    # codes against the scale and bias as stored (rounded to fp16/bf16 on Metal)
    step_s, origin_s = _round_to(step, scale_dtype), _round_to(origin, scale_dtype)
    safe = np.where(step_s != 0, step_s, 1).astype(np.float64)
    u = np.rint((xf - origin_s[:, None].astype(np.float64)) / safe[:, None])
    codes = np.clip(u, 0, levels).astype(np.uint8)
    return codes, step.reshape(-1, 1), origin.reshape(-1, 1)


# -- the repack --------------------------------------------------------------------------

def repack_tensor(qt: QuantTensor, scale_dtype="float32", dense_dtype=None,
           requant_bits: dict | None = None) -> MLXWeight:
    """Repack a 2-D GGUF tensor for MLX, a row chunk at a time.

    scale_dtype: dtype of the scales and biases (float32: exact; float16/bfloat16: Metal).
    dense_dtype: dtype of F32/F16/BF16 weights (None: keep the file's dtype).
    requant_bits: override `REQUANT_BITS` for Q6_K/Q3_K/Q2_K (bits in 2..8).
    """
    if len(qt.shape) != 2:
        raise ValueError(f"{qt.name}: MLX weights are 2-D, got shape {qt.shape}")
    ggml_type = T(qt.ggml_type)
    n_rows, n_cols = qt.shape
    scale_dtype = mx_dtype(scale_dtype)
    data = np.asarray(qt.data).reshape(n_rows, -1)

    if ggml_type in DENSE_TYPES:
        w = _dense(data, ggml_type, n_cols)
        if dense_dtype is not None:
            w = w.astype(mx_dtype(dense_dtype))
        return MLXWeight(ggml_type.name, (n_rows, n_cols), w)

    if ggml_type in EXACT_BITS:
        bits, exact = EXACT_BITS[ggml_type], True
    elif ggml_type in REQUANT_BITS:
        bits, exact = (requant_bits or {}).get(ggml_type, REQUANT_BITS[ggml_type]), False
        if not 2 <= bits <= 8:
            raise ValueError(f"requant bits must be in 2..8, got {bits}")
    else:
        raise UnsupportedModelError(f"the MLX backend cannot load {ggml_type.name} tensors "
                                    f"({qt.name})")
    if n_cols % GROUP:
        raise ValueError(f"{qt.name}: row length {n_cols} is not a multiple of {GROUP}")

    block_size, type_size = FORMATS[ggml_type].block_size, FORMATS[ggml_type].type_size
    packed = np.empty((n_rows, n_cols * bits // 32), dtype=np.uint32)
    scales = np.empty((n_rows, n_cols // GROUP), dtype=np.float32)
    biases = np.empty_like(scales)
    step = max(1, CHUNK_ELEMENTS // n_cols)
    for r in range(0, n_rows, step):
        blocks = np.ascontiguousarray(data[r:r + step]).reshape(-1, type_size)
        n = blocks.shape[0] * block_size // n_cols
        if exact:
            codes, sc, bi = _exact_fields(ggml_type, blocks)
        else:
            codes, sc, bi = _requant_fields(ggml_type, blocks, bits, scale_dtype)
        packed[r:r + n] = pack_codes(codes.reshape(n, n_cols), bits)
        scales[r:r + n] = sc.reshape(n, -1)
        biases[r:r + n] = bi.reshape(n, -1)
    note = "" if exact else "requantized from 16-groups, anchored grid"
    m_scales, m_biases = mx.array(scales), mx.array(biases)
    if scale_dtype != mx.float32:
        s16, b16 = m_scales.astype(scale_dtype), m_biases.astype(scale_dtype)
        back_s, back_b = np.array(s16.astype(mx.float32)), np.array(b16.astype(mx.float32))
        if not (np.isfinite(back_s).all() and np.isfinite(back_b).all()):
            # a scale or bias past the half type's range: keep this tensor's in float32
            kept = f"kept fp32: {dtype_name(scale_dtype)} overflows"
            note = f"{note}; {kept}" if note else kept
        else:
            if exact and not (np.array_equal(back_s, scales) and np.array_equal(back_b, biases)):
                exact, note = False, f"scales rounded to {dtype_name(scale_dtype)}"
            m_scales, m_biases = s16, b16
    w = MLXWeight(ggml_type.name, (n_rows, n_cols), mx.array(packed), m_scales, m_biases,
                  bits=bits, exact=exact, note=note)
    del packed, scales, biases
    mx.eval(w.w, w.scales, w.biases)
    return w


def _dense(data: np.ndarray, ggml_type, n_cols: int) -> mx.array:
    if ggml_type == T.F32:
        return mx.array(np.ascontiguousarray(data).view(np.float32).reshape(-1, n_cols))
    if ggml_type == T.F16:
        return mx.array(np.ascontiguousarray(data).view(np.float16).reshape(-1, n_cols))
    bf = np.ascontiguousarray(data).view(np.uint16).reshape(-1, n_cols)
    return mx.array(bf).view(mx.bfloat16)


# -- error measurement -------------------------------------------------------------------

def stored_values(w: MLXWeight) -> np.ndarray:
    """What the stored codes, scales and biases represent: scale*code + bias computed
    exactly (float64) and rounded once to float32, on the host with no MLX arithmetic, so
    it isolates the representation's rounding from the kernel's."""
    codes = unpack_codes(np.array(w.w), w.bits).astype(np.float64)
    scale = np.array(w.scales.astype(mx.float32)).astype(np.float64)
    bias = np.array(w.biases.astype(mx.float32)).astype(np.float64)
    n, k = w.shape
    g = codes.reshape(n, k // w.group_size, w.group_size)
    return (g * scale[:, :, None] + bias[:, :, None]).reshape(n, k).astype(np.float32)


def measure_error(qt: QuantTensor, scale_dtype="float32", requant_bits=None,
                  max_rows: int | None = None, via: str = "stored") -> dict:
    """Repack (the first `max_rows` rows of) `qt` and compare with the numpy reference.

    via="stored": the values the stored codes/scales/biases represent (exact arithmetic):
    the representation's error. via="mlx": `mx.dequantize(..., dtype=float32)`, which
    with fp16/bf16 scales also computes in that dtype on MLX's CPU build.
    Returns max abs error, max abs error / max|w|, RMS error / RMS w, bit-exactness.
    """
    if max_rows is not None and qt.shape[0] > max_rows:
        qt = qt.take_rows(np.arange(max_rows))
    w = repack_tensor(qt, scale_dtype=scale_dtype, requant_bits=requant_bits)
    got = np.array(w.dequantize(mx.float32)) if via == "mlx" else stored_values(w)
    got = got.astype(np.float64)
    ref = qt.dequantize().astype(np.float64)
    err = np.abs(got - ref)
    scale = float(np.abs(ref).max()) or 1.0
    rms = float(np.sqrt(np.mean(ref ** 2))) or 1.0
    return {"type": qt.type_name, "scale_dtype": dtype_name(mx_dtype(scale_dtype)),
            "via": via, "bits": w.bits, "exact": bool(np.array_equal(got, ref)),
            "max_abs": float(err.max()), "max_rel": float(err.max()) / scale,
            "rms_rel": float(np.sqrt(np.mean(err ** 2))) / rms,
            "bits_per_weight": w.bits_per_weight}
