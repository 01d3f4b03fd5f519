"""GGUF blocks split into planes for the Triton kernels (host side, once at load).

A GGUF row is a run of blocks whose fields sit at odd byte offsets (a Q4_0 block is 18
bytes: an fp16 scale, then 16 bytes of nibbles). A GPU kernel wants each field as its own
contiguous, aligned array so a warp's loads are wide and coalesced, and wants the quantized
codes in element order so one tile loader serves the GEMV, the GEMM and the embedding. So
each weight becomes a few planes, every one row-major with one row per weight row, holding
exactly the GGUF bytes (nbytes equals the GGUF tensor's size):

    d   fp16  (N, blocks)         block scale (Q4_K/Q5_K/Q6_K: super-block d)
    m   fp16  (N, blocks)         Q4_1/Q5_1 min, Q4_K/Q5_K dmin
    sc  uint8 (N, blocks * 12)    Q4_K/Q5_K packed 6-bit scales, as stored (decoded in-kernel)
        int8  (N, blocks * 16)    Q6_K sub-block scales
    q   uint8 (N, K / 2)          low 4 bits of the codes, two per byte in element order
                                  (element 2i in the low nibble, 2i+1 in the high one)
        int8  (N, K)              Q8_0 codes
    qh  uint8 (N, K / 8)          Q5_*: the fifth bit, 8 elements per byte (bit i = element i)
        uint8 (N, K / 4)          Q6_K: the top 2 bits, 4 elements per byte (bits 2i, 2i+1)

Codes are unsigned here: Q6_K's signed q is stored as q + 32 (as GGUF does) and the kernels
subtract the offset, so the formulas match quant/dequant.py operation for operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from diptych.quant import dequant as dq
from diptych.quant.formats import FORMATS, QuantFormat


@dataclass(frozen=True)
class TypeInfo:
    unpack: object  # the quant/dequant.py unpack function
    fmt: QuantFormat

    @property
    def group(self) -> int:
        """Elements sharing one scale."""
        return self.fmt.unit

    @property
    def block(self) -> int:
        """Elements per GGUF block."""
        return self.fmt.block_size

    @property
    def high_bits(self) -> int:
        """Bits of the code above the low nibble (0, 1 or 2); Q8_0: 8 (whole-byte codes)."""
        return 8 if self.fmt.signed_codes else self.fmt.code_bits - 4


KERNEL_TYPES: dict[QT, TypeInfo] = {t: TypeInfo(unpack, FORMATS[t]) for t, unpack in (
    (QT.Q4_0, dq.unpack_q4_0), (QT.Q4_1, dq.unpack_q4_1), (QT.Q5_0, dq.unpack_q5_0),
    (QT.Q5_1, dq.unpack_q5_1), (QT.Q8_0, dq.unpack_q8_0), (QT.IQ4_NL, dq.unpack_iq4_nl),
    (QT.Q4_K, dq.unpack_q4_k), (QT.Q5_K, dq.unpack_q5_k), (QT.Q6_K, dq.unpack_q6_k))}

PLANE_ORDER = ("q", "qh", "d", "m", "sc")

_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # bounds the unpack temporaries, whatever the tensor size


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    low = codes & 0x0F
    return (low[:, 0::2] | (low[:, 1::2] << 4)).astype(np.uint8)


def _pack_bits(bits: np.ndarray, width: int) -> np.ndarray:
    """(n, K) fields of `width` bits -> (n, K * width / 8) bytes, element 0 in the low bits."""
    per = 8 // width
    out = np.zeros((bits.shape[0], bits.shape[1] // per), np.uint8)
    for i in range(per):
        out |= (bits[:, i::per].astype(np.uint8) << (width * i)).astype(np.uint8)
    return out


def _planes_of(blocks: np.ndarray, ggml_type: QT, n_rows: int) -> dict[str, np.ndarray]:
    info = KERNEL_TYPES[ggml_type]
    fields = info.unpack(blocks)
    fmt = info.fmt
    d = fields[0].reshape(n_rows, -1).astype(np.float16)
    out = {"d": d}
    if fmt.has_bias:
        out["m"] = fields[1].reshape(n_rows, -1).astype(np.float16)
    codes = fields[-1].reshape(n_rows, -1)
    if ggml_type in (QT.Q4_K, QT.Q5_K):
        out["sc"] = np.ascontiguousarray(blocks[:, fmt.scales.slice]).reshape(n_rows, -1)
    if ggml_type == QT.Q6_K:
        out["sc"] = fields[1].reshape(n_rows, -1)
        codes = (codes.astype(np.int16) - fmt.code_offset).astype(np.uint8)
    if info.high_bits == 8:
        out["q"] = np.ascontiguousarray(codes, dtype=np.int8)
        return out
    out["q"] = _pack_nibbles(codes)
    if info.high_bits:
        out["qh"] = _pack_bits(codes >> 4, info.high_bits)
    return out


def split_planes(data: np.ndarray, ggml_type: QT, n_cols: int) -> dict[str, np.ndarray]:
    """Raw GGUF rows (n_rows, row_bytes) uint8 -> the planes above, as numpy arrays."""
    ggml_type = QT(ggml_type)
    fmt = FORMATS[ggml_type]
    type_size = fmt.type_size
    rows = np.asarray(data, dtype=np.uint8).reshape(-1, fmt.row_bytes(n_cols))
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // n_cols)
    parts = [_planes_of(np.ascontiguousarray(rows[r:r + step]).reshape(-1, type_size),
                        ggml_type, min(step, len(rows) - r))
             for r in range(0, len(rows), step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def plane_shapes(ggml_type: QT, n_rows: int, n_cols: int) -> dict[str, tuple[tuple, np.dtype]]:
    """The (shape, dtype) of each plane split_planes makes for an (n_rows, n_cols) weight."""
    ggml_type = QT(ggml_type)
    info = KERNEL_TYPES[ggml_type]
    fmt = info.fmt
    n_blocks = n_cols // info.block
    out = {"d": ((n_rows, n_blocks), np.dtype(np.float16))}
    if fmt.has_bias:
        out["m"] = ((n_rows, n_blocks), np.dtype(np.float16))
    if ggml_type in (QT.Q4_K, QT.Q5_K):
        out["sc"] = ((n_rows, n_blocks * fmt.scales.size), np.dtype(np.uint8))
    if ggml_type == QT.Q6_K:
        out["sc"] = ((n_rows, n_blocks * fmt.scales.size), np.dtype(np.int8))
    if info.high_bits == 8:
        out["q"] = ((n_rows, n_cols), np.dtype(np.int8))
        return out
    out["q"] = ((n_rows, n_cols // 2), np.dtype(np.uint8))
    if info.high_bits:
        out["qh"] = ((n_rows, n_cols * info.high_bits // 8), np.dtype(np.uint8))
    return out
