"""The GGML block formats the project supports: one record per type, the layout read by every
consumer (reference dequantizer, CPU and CUDA kernels, MLX repack, GGUF writer, `info`).

Modelled on ggml's `type_traits` table and built on gguf-py's constants: block size and
bytes per block come from `gguf.GGML_QUANT_SIZES`. What gguf-py does not describe is the
byte layout of a block, recorded here as fields (byte offset, size):

    d       the fp16 block scale (K-quants: the super-block scale)
    m       the fp16 min (Q4_1, Q5_1) or super-block min `dmin` (Q2_K, Q4_K, Q5_K)
    scales  the packed sub-block scales (K-quants), decoded as `scale_packing` says
    qs      the low bits of the codes (Q8_0: the int8 codes)
    qh      the high bits of the codes (Q5_*, Q3_K's hmask, Q6_K)

and a value is  x = d * (code + code_offset)  for the legacy types,  d * codebook[code]  for
IQ4_NL, and  (d * sc) * (code + code_offset) - (dmin * mn)  per sub-block of `unit`
elements for the K-quants (Q2_K/Q4_K/Q5_K with mins, Q3_K/Q6_K with signed scales and no
min). `code` is the unsigned integer made of the `code_bits` bits (Q8_0: a signed byte).
Where inside `qs`/`qh` each element's bits sit is specific to each type: quant/dequant.py's
unpack functions spell that out once, in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from diptych.errors import UnsupportedModelError

T = GGMLQuantizationType

#: IQ4_NL's 16-entry non-linear codebook (ggml's kvalues_iq4nl).
IQ4_NL_CODEBOOK = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                            1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
IQ4_NL_CODEBOOK.flags.writeable = False


@dataclass(frozen=True)
class Field:
    """A field of a block: `size` bytes from byte `offset`."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.end)


@dataclass(frozen=True)
class QuantFormat:
    """One GGML type: sizes (from gguf-py) and the layout of its blocks."""

    type: GGMLQuantizationType
    block_size: int                  # elements per block
    type_size: int                   # bytes per block
    code_bits: int = 0               # bits per element code (0: a float type)
    unit: int = 0                    # elements sharing one scale (a sub-block)
    code_offset: int = 0             # x = scale * (code + code_offset) (+ bias)
    signed_codes: bool = False       # codes are int8 (Q8_0)
    d: Field | None = None
    m: Field | None = None           # min / dmin: the format has a per-unit bias
    scales: Field | None = None
    scale_packing: str = ""          # "" | "4+4" (Q2_K) | "6-bit x16" (Q3_K) |
    #                                  "6-bit scale+min x8" (Q4_K, Q5_K) | "int8" (Q6_K)
    qs: Field | None = None
    qh: Field | None = None
    codebook: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def quantized(self) -> bool:
        return self.code_bits > 0

    @property
    def has_bias(self) -> bool:
        """Whether a unit's value has an additive min term (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)."""
        return self.m is not None

    @property
    def units_per_block(self) -> int:
        return self.block_size // self.unit if self.unit else 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of `n_cols` elements (a multiple of block_size)."""
        return row_bytes(self.type, n_cols)

    def describe(self) -> str:
        """One line for `info`: block geometry, bits per weight and how scales are stored."""
        if not self.quantized:
            return f"{self.name}: {8 * self.type_size}-bit floats"
        text = (f"{self.name}: blocks of {self.block_size} in {self.type_size} bytes "
                f"({self.bits_per_weight:.4g} bits/weight), {self.code_bits}-bit codes")
        if self.codebook is not None:
            text += f" into a {len(self.codebook)}-value codebook"
        if self.unit < self.block_size:
            text += (f", {self.units_per_block} sub-blocks of {self.unit} "
                     f"({self.scale_packing} scales)")
        return text + (", with mins" if self.has_bias else "")


def row_bytes(ggml_type, n_cols: int) -> int:
    """Bytes of a row of `n_cols` elements of any GGML type gguf-py knows (ggml_row_size)."""
    t = GGMLQuantizationType(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[t]
    if n_cols % block_size:
        raise ValueError(f"{t.name}: row length {n_cols} is not a multiple of {block_size}")
    return n_cols // block_size * type_size


def _format(t: T, **layout) -> QuantFormat:
    block_size, type_size = GGML_QUANT_SIZES[t]
    layout.setdefault("unit", block_size)
    fmt = QuantFormat(t, block_size, type_size, **layout)
    end = max((f.end for f in (fmt.d, fmt.m, fmt.scales, fmt.qs, fmt.qh) if f), default=0)
    assert not fmt.quantized or end == type_size, f"{t.name}: fields end at {end}, not {type_size}"
    return fmt


def _f16(offset: int) -> Field:
    return Field(offset, 2)


_FORMATS = (
    _format(T.F32), _format(T.F16), _format(T.BF16),
    _format(T.Q4_0, code_bits=4, code_offset=-8, d=_f16(0), qs=Field(2, 16)),
    _format(T.Q4_1, code_bits=4, d=_f16(0), m=_f16(2), qs=Field(4, 16)),
    _format(T.Q5_0, code_bits=5, code_offset=-16, d=_f16(0), qh=Field(2, 4), qs=Field(6, 16)),
    _format(T.Q5_1, code_bits=5, d=_f16(0), m=_f16(2), qh=Field(4, 4), qs=Field(8, 16)),
    _format(T.Q8_0, code_bits=8, signed_codes=True, d=_f16(0), qs=Field(2, 32)),
    _format(T.IQ4_NL, code_bits=4, d=_f16(0), qs=Field(2, 16), codebook=IQ4_NL_CODEBOOK),
    _format(T.Q2_K, code_bits=2, unit=16, scales=Field(0, 16), scale_packing="4+4",
            qs=Field(16, 64), d=_f16(80), m=_f16(82)),
    _format(T.Q3_K, code_bits=3, unit=16, code_offset=-4, qh=Field(0, 32), qs=Field(32, 64),
            scales=Field(96, 12), scale_packing="6-bit x16", d=_f16(108)),
    _format(T.Q4_K, code_bits=4, unit=32, d=_f16(0), m=_f16(2), scales=Field(4, 12),
            scale_packing="6-bit scale+min x8", qs=Field(16, 128)),
    _format(T.Q5_K, code_bits=5, unit=32, d=_f16(0), m=_f16(2), scales=Field(4, 12),
            scale_packing="6-bit scale+min x8", qh=Field(16, 32), qs=Field(48, 128)),
    _format(T.Q6_K, code_bits=6, unit=16, code_offset=-32, qs=Field(0, 128), qh=Field(128, 64),
            scales=Field(192, 16), scale_packing="int8", d=_f16(208)),
)

#: GGML type -> its format, for every type the project reads.
FORMATS: dict[GGMLQuantizationType, QuantFormat] = {f.type: f for f in _FORMATS}
FLOAT_TYPES = tuple(t for t, f in FORMATS.items() if not f.quantized)
QUANT_TYPES = tuple(t for t, f in FORMATS.items() if f.quantized)
#: The K-quants' super-block size (ggml's QK_K).
QK_K = FORMATS[T.Q4_K].block_size


def quant_format(ggml_type) -> QuantFormat:
    """The format of a GGML type (a GGMLQuantizationType or its number); a type outside
    FORMATS raises UnsupportedModelError."""
    try:
        t = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise UnsupportedModelError(f"unknown ggml tensor type {ggml_type!r}") from None
    try:
        return FORMATS[t]
    except KeyError:
        raise UnsupportedModelError(
            f"ggml type {t.name} is not supported (supported: "
            f"{', '.join(t.name for t in FORMATS)})") from None
