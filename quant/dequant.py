"""Numpy reference dequantizers for the GGML block formats, bit-exact with gguf-py.

One `unpack_<type>(blocks)` per block format splits raw blocks (uint8, one block per row,
see `as_blocks`) into their fields as numpy arrays, quants in element order; the matching
`dequantize_<type>(blocks)` applies ggml's formula in float32 with ggml's (and
`gguf.quants.dequantize`'s) order of operations, so results are bit-identical. Backends use
the unpack functions to repack blocks for their kernels: one place per layout.

The byte layout of every format (field offsets, code bits, sub-block size) is read from
quant/formats.py; where inside qs/qh each element's bits sit is spelled out here, once.
The scale fields of the "unpack" results are float32 of shape (n_blocks, 1); integer
fields keep small integer dtypes (uint8, or int8 where the value is signed).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .formats import FORMATS, QK_K, quant_format

T = GGMLQuantizationType
_F = FORMATS

_SHIFT_4 = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
_SHIFT_2 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
_SHIFT_1 = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)


# -- field helpers -----------------------------------------------------------------------

def as_blocks(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """View raw tensor bytes (any shape, uint8) as (n_blocks, type_size) blocks."""
    type_size = quant_format(ggml_type).type_size
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, type_size)


def _f16(blocks: np.ndarray, field) -> np.ndarray:
    """An fp16 field (formats.Field) of every block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, field.slice]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Split bytes in runs of `group`: each run gives `group` low nibbles, then high ones."""
    n = qs.shape[0]
    return ((qs.reshape(n, -1, 1, group) >> _SHIFT_4) & 0x0F).reshape(n, -1)


def _crumbs(qs: np.ndarray, group: int) -> np.ndarray:
    """2-bit fields: each run of `group` bytes gives bits 0-1 of all, then 2-3, 4-5, 6-7."""
    n = qs.shape[0]
    return ((qs.reshape(n, -1, 1, group) >> _SHIFT_2) & 0x03).reshape(n, -1)


def _bit_planes(h: np.ndarray) -> np.ndarray:
    """K-quant high-bit masks (n, 32): element 32*i + l is bit i of byte l."""
    n = h.shape[0]
    return ((h.reshape(n, 1, 1, 32) >> _SHIFT_1) & 0x01).reshape(n, -1)


def _q5_high(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 qh (n, 4), a little-endian u32: bit j is element j's fifth bit."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K packed 6-bit scales (n, 12) -> (sc, m), each uint8 (n, 8) in 0..63.

    Sub-block j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: the low 4 bits come from
    s[j+4] (sc low nibble, m high nibble), the top 2 bits from s[j-4] and s[j] bits 6-7.
    """
    s = scales.reshape(-1, 3, 4)
    lo, hi, mix = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=1)
    return sc, m


def q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Q3_K packed 6-bit scales (n, 12) -> int8 (n, 16) in -32..31.

    Scale i takes its low 4 bits from byte i % 8 (low nibble for i < 8, high for i >= 8)
    and its top 2 bits from byte 8 + i % 4, bits 2*(i // 4) .. +1.
    """
    n = scales.shape[0]
    low = ((scales[:, :8].reshape(n, 1, 8) >> _SHIFT_4.reshape(1, 2, 1)) & 0x0F).reshape(n, 16)
    high = ((scales[:, 8:].reshape(n, 1, 4) >> _SHIFT_2.reshape(1, 4, 1)) & 0x03).reshape(n, 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


# -- unpack: one function per layout -----------------------------------------------------

def unpack_q4_0(blocks):
    """-> (d f32 (n,1), q uint8 (n,32) in 0..15); x = d * (q - 8)."""
    f = _F[T.Q4_0]
    return _f16(blocks, f.d), _nibbles(blocks[:, f.qs.slice], 16)


def unpack_q4_1(blocks):
    """-> (d, m f32 (n,1), q uint8 (n,32) in 0..15); x = d * q + m."""
    f = _F[T.Q4_1]
    return _f16(blocks, f.d), _f16(blocks, f.m), _nibbles(blocks[:, f.qs.slice], 16)


def unpack_q5_0(blocks):
    """-> (d f32 (n,1), q uint8 (n,32) in 0..31); x = d * (q - 16)."""
    f = _F[T.Q5_0]
    q = _nibbles(blocks[:, f.qs.slice], 16) | (_q5_high(blocks[:, f.qh.slice]) << 4)
    return _f16(blocks, f.d), q


def unpack_q5_1(blocks):
    """-> (d, m f32 (n,1), q uint8 (n,32) in 0..31); x = d * q + m."""
    f = _F[T.Q5_1]
    q = _nibbles(blocks[:, f.qs.slice], 16) | (_q5_high(blocks[:, f.qh.slice]) << 4)
    return _f16(blocks, f.d), _f16(blocks, f.m), q


def unpack_q8_0(blocks):
    """-> (d f32 (n,1), q int8 (n,32)); x = q * d."""
    f = _F[T.Q8_0]
    return _f16(blocks, f.d), np.ascontiguousarray(blocks[:, f.qs.slice]).view(np.int8)


def unpack_iq4_nl(blocks):
    """-> (d f32 (n,1), index uint8 (n,32) in 0..15); x = d * codebook[index]."""
    f = _F[T.IQ4_NL]
    return _f16(blocks, f.d), _nibbles(blocks[:, f.qs.slice], 16)


def unpack_q2_k(blocks):
    """-> (d, dmin f32 (n,1), sc, m uint8 (n,16) in 0..15, q uint8 (n,256) in 0..3).

    Element e belongs to group e // 16: x = (d * sc) * q - (dmin * m).
    """
    f = _F[T.Q2_K]
    scales = blocks[:, f.scales.slice]
    return (_f16(blocks, f.d), _f16(blocks, f.m), scales & 0x0F, scales >> 4,
            _crumbs(blocks[:, f.qs.slice], 32))


def unpack_q3_k(blocks):
    """-> (d f32 (n,1), sc int8 (n,16) in -32..31, q int8 (n,256) in -4..3).

    q = low 2 bits - 4 where the hmask bit is 0; group e // 16: x = (d * sc) * q.
    """
    f = _F[T.Q3_K]
    low = _crumbs(blocks[:, f.qs.slice], 32).astype(np.int8)
    high = _bit_planes(blocks[:, f.qh.slice]).astype(np.int8)
    q = low - ((high ^ 1) << 2)
    return _f16(blocks, f.d), q3_k_scales(blocks[:, f.scales.slice]), q


def unpack_q4_k(blocks):
    """-> (d, dmin f32 (n,1), sc, m uint8 (n,8) in 0..63, q uint8 (n,256) in 0..15).

    Group e // 32: x = (d * sc) * q - (dmin * m).
    """
    f = _F[T.Q4_K]
    sc, m = q4_k_scales(blocks[:, f.scales.slice])
    return _f16(blocks, f.d), _f16(blocks, f.m), sc, m, _nibbles(blocks[:, f.qs.slice], 32)


def unpack_q5_k(blocks):
    """-> (d, dmin f32 (n,1), sc, m uint8 (n,8) in 0..63, q uint8 (n,256) in 0..31)."""
    f = _F[T.Q5_K]
    sc, m = q4_k_scales(blocks[:, f.scales.slice])
    q = _nibbles(blocks[:, f.qs.slice], 32) | (_bit_planes(blocks[:, f.qh.slice]) << 4)
    return _f16(blocks, f.d), _f16(blocks, f.m), sc, m, q


def unpack_q6_k(blocks):
    """-> (d f32 (n,1), sc int8 (n,16), q int8 (n,256) in -32..31); group e // 16: x = (d*sc)*q.

    Within each half (128 elements): low 4 bits from 64 ql bytes (low nibbles, then high),
    top 2 bits from 32 qh bytes (bits 0-1 for elements 0..31, 2-3 for 32..63, ...).
    """
    f = _F[T.Q6_K]
    n = blocks.shape[0]
    low = _nibbles(blocks[:, f.qs.slice], 64)
    high = _crumbs(blocks[:, f.qh.slice], 32)
    q = (low | (high << 4)).astype(np.int8) + np.int8(f.code_offset)
    sc = np.ascontiguousarray(blocks[:, f.scales.slice]).view(np.int8).reshape(n, -1)
    return _f16(blocks, f.d), sc, q


# -- dequantize: one function per format -------------------------------------------------

def _grouped(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    """scale (n, g) times q (n, g*k) group-wise, float32 -> (n, g, k)."""
    n, g = scale.shape
    return scale.reshape(n, g, 1) * q.reshape(n, g, -1).astype(np.float32)


def dequantize_f32(blocks):
    return blocks.view(np.float32).copy()


def dequantize_f16(blocks):
    return blocks.view(np.float16).astype(np.float32)


def dequantize_bf16(blocks):
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_q4_0(blocks):
    d, q = unpack_q4_0(blocks)
    return d * (q.astype(np.int8) + np.int8(_F[T.Q4_0].code_offset)).astype(np.float32)


def dequantize_q4_1(blocks):
    d, m, q = unpack_q4_1(blocks)
    return d * q.astype(np.float32) + m


def dequantize_q5_0(blocks):
    d, q = unpack_q5_0(blocks)
    return d * (q.astype(np.int8) + np.int8(_F[T.Q5_0].code_offset)).astype(np.float32)


def dequantize_q5_1(blocks):
    d, m, q = unpack_q5_1(blocks)
    return d * q.astype(np.float32) + m


def dequantize_q8_0(blocks):
    d, q = unpack_q8_0(blocks)
    return q.astype(np.float32) * d


def dequantize_iq4_nl(blocks):
    d, idx = unpack_iq4_nl(blocks)
    return d * _F[T.IQ4_NL].codebook[idx].astype(np.float32)


def _affine_k(d, dmin, sc, m, q):
    """Q2_K/Q4_K/Q5_K: (d*sc) * q - (dmin*m) per group, flattened to (n, 256)."""
    scale, bias = d * sc.astype(np.float32), dmin * m.astype(np.float32)
    return (_grouped(scale, q) - bias[:, :, None]).reshape(-1, QK_K)


def dequantize_q2_k(blocks):
    return _affine_k(*unpack_q2_k(blocks))


def dequantize_q3_k(blocks):
    d, sc, q = unpack_q3_k(blocks)
    return _grouped(d * sc.astype(np.float32), q).reshape(-1, QK_K)


def dequantize_q4_k(blocks):
    return _affine_k(*unpack_q4_k(blocks))


def dequantize_q5_k(blocks):
    return _affine_k(*unpack_q5_k(blocks))


def dequantize_q6_k(blocks):
    d, sc, q = unpack_q6_k(blocks)
    return _grouped(d * sc.astype(np.float32), q).reshape(-1, QK_K)


DEQUANTIZERS = {
    T.F32: dequantize_f32, T.F16: dequantize_f16, T.BF16: dequantize_bf16,
    T.Q4_0: dequantize_q4_0, T.Q4_1: dequantize_q4_1, T.Q5_0: dequantize_q5_0,
    T.Q5_1: dequantize_q5_1, T.Q8_0: dequantize_q8_0,
    T.Q2_K: dequantize_q2_k, T.Q3_K: dequantize_q3_k, T.Q4_K: dequantize_q4_k,
    T.Q5_K: dequantize_q5_k, T.Q6_K: dequantize_q6_k, T.IQ4_NL: dequantize_iq4_nl,
}
SUPPORTED_TYPES = frozenset(DEQUANTIZERS)

_CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries (a few x 16 MB), whatever the tensor size


def dequantize_blocks(blocks: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Blocks (n_blocks, type_size) uint8 -> float32 (n_blocks, block_size)."""
    return DEQUANTIZERS[quant_format(ggml_type).type](as_blocks(blocks, ggml_type))


def dequantize_rows(data: np.ndarray, ggml_type: GGMLQuantizationType, n_cols: int) -> np.ndarray:
    """Raw rows (n_rows, row_bytes) uint8 -> float32 (n_rows, n_cols).

    Any type outside SUPPORTED_TYPES raises UnsupportedModelError. Works on memory-mapped
    data a slice of rows at a time, so temporaries stay small.
    """
    fmt = quant_format(ggml_type)
    ggml_type, type_size = fmt.type, fmt.type_size
    row_bytes = fmt.row_bytes(n_cols)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"expected uint8 block data, got {data.dtype}")
    if row_bytes == 0:  # zero-length rows
        return np.empty((data.shape[0] if data.ndim > 1 else 1, 0), dtype=np.float32)
    if data.size % row_bytes:
        raise ValueError(f"{data.nbytes} bytes are not whole {ggml_type.name} rows of {n_cols}")
    n_rows = data.size // row_bytes
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    if n_rows == 0:
        return out
    rows = data.reshape(n_rows, row_bytes)
    fn = DEQUANTIZERS[ggml_type]
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    for r in range(0, n_rows, step):
        blocks = np.ascontiguousarray(rows[r:r + step]).reshape(-1, type_size)
        out[r:r + step] = fn(blocks).reshape(-1, n_cols)
    return out

