"""The numpy reference dequantizers against gguf-py's (the oracle), bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from diptych.errors import UnsupportedModelError
from diptych.quant import dequant as dq
from diptych.quant.gguf_file import GGUFFile

# Byte offsets of the fp16 fields of each block type: random bytes there would often be
# NaN/inf, so the tests write finite halves (zeros, subnormals and negatives included).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0],
}
ALL_TYPES = [T.F32, T.F16, T.BF16, *F16_FIELDS]


def random_blocks(ggml_type, n_blocks, rng):
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(ggml_type, []):
        half = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint32).astype(np.uint16)
        half[(half & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)  # exponent 31 -> 15: finite
        blocks[:, off:off + 2] = half.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def oracle(data, ggml_type, shape):
    return np.asarray(gguf.quants.dequantize(np.asarray(data), ggml_type),
                      dtype=np.float32).reshape(shape)


def assert_bits_equal(ours, ref):
    """Bit-exact: same float32 bit patterns (so NaN == NaN and -0.0 != 0.0)."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    same = ours.view(np.uint32) == ref.view(np.uint32)
    if not same.all():
        i = np.argwhere(~same)[0]
        raise AssertionError(f"{(~same).sum()} values differ, first at {tuple(i)}: "
                             f"{ours[tuple(i)]!r} vs {ref[tuple(i)]!r}")


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(ggml_type):
    rng = np.random.default_rng(ggml_type.value)
    block_size, _ = GGML_QUANT_SIZES[ggml_type]
    n_rows, blocks_per_row = 7, 37
    blocks = random_blocks(ggml_type, n_rows * blocks_per_row, rng)
    data = blocks.reshape(n_rows, -1)
    n_cols = blocks_per_row * block_size
    ours = dq.dequantize_rows(data, ggml_type, n_cols)
    assert_bits_equal(ours, oracle(data, ggml_type, (n_rows, n_cols)))
    assert_bits_equal(dq.dequantize_blocks(blocks, ggml_type),
                      oracle(blocks, ggml_type, (len(blocks), block_size)))


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_chunked_rows_and_strided_input(ggml_type, monkeypatch):
    # Small chunks force several slices; a non-contiguous row view must work too.
    monkeypatch.setattr(dq, "_CHUNK_ELEMENTS", 300)
    rng = np.random.default_rng(100 + ggml_type.value)
    block_size, _ = GGML_QUANT_SIZES[ggml_type]
    data = random_blocks(ggml_type, 40 * 3, rng).reshape(40, -1)[::2]
    n_cols = 3 * block_size
    assert_bits_equal(dq.dequantize_rows(data, ggml_type, n_cols),
                      oracle(np.ascontiguousarray(data), ggml_type, (20, n_cols)))


def test_unsupported_types_raise():
    data = np.zeros((1, GGML_QUANT_SIZES[T.IQ2_XXS][1]), np.uint8)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        dq.dequantize_rows(data, T.IQ2_XXS, 256)
    with pytest.raises(UnsupportedModelError, match="4"):
        dq.dequantize_rows(data, 4, 256)  # the removed Q4_2 type id


def test_unpack_shapes_and_ranges():
    rng = np.random.default_rng(7)
    b = random_blocks(T.Q4_K, 5, rng)
    d, dmin, sc, m, q = dq.unpack_q4_k(b)
    assert d.shape == dmin.shape == (5, 1) and d.dtype == np.float32
    assert sc.shape == m.shape == (5, 8) and sc.max() < 64 and m.max() < 64
    assert q.shape == (5, 256) and q.max() < 16
    d, sc, q = dq.unpack_q3_k(random_blocks(T.Q3_K, 5, rng))
    assert sc.dtype == np.int8 and -32 <= sc.min() and sc.max() <= 31
    assert q.dtype == np.int8 and -4 <= q.min() and q.max() <= 3
    d, sc, q = dq.unpack_q6_k(random_blocks(T.Q6_K, 5, rng))
    assert q.dtype == np.int8 and -32 <= q.min() and q.max() <= 31
    d, m, q = dq.unpack_q4_1(random_blocks(T.Q4_1, 5, rng))
    assert d.shape == m.shape == (5, 1) and q.shape == (5, 32) and q.dtype == np.uint8
    d, q = dq.unpack_q5_0(random_blocks(T.Q5_0, 5, rng))
    assert q.shape == (5, 32) and q.max() <= 31


def test_q4_k_affine_form_matches():
    # What the MLX repack relies on: sub-block j is scale d*sc_j, bias -dmin*m_j (group 32).
    b = random_blocks(T.Q4_K, 9, np.random.default_rng(3))
    d, dmin, sc, m, q = dq.unpack_q4_k(b)
    scale = np.repeat(d * sc.astype(np.float32), 32, axis=1)
    bias = np.repeat(dmin * m.astype(np.float32), 32, axis=1)
    assert_bits_equal(scale * q.astype(np.float32) - bias, dq.dequantize_q4_k(b))


def _one_tensor_per_type(path):
    """The smallest tensor of each type in a real file (keeps the test fast)."""
    f = GGUFFile(path)
    chosen = {}
    for t in f.tensors.values():
        if t.ggml_type not in chosen or t.nbytes < chosen[t.ggml_type].nbytes:
            chosen[t.ggml_type] = t
    return f, chosen


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path"])
def test_real_model_tensors_bit_exact(model, request):
    f, chosen = _one_tensor_per_type(request.getfixturevalue(model))
    expected = {"smollm2_path": {T.Q4_1, T.Q8_0, T.F32},
                "qwen_path": {T.Q5_0, T.Q8_0, T.Q6_K, T.Q4_K, T.F32}}[model]
    assert set(chosen) == expected
    for t in chosen.values():
        assert_bits_equal(t.dequantize(), oracle(t.data, t.ggml_type, t.shape))
    f.close()
