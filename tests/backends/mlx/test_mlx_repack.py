"""GGUF blocks -> MLX affine repack: bit-exactness, measured bounds, linear and embed."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from diptych.backends.mlx import MLXBackend  # noqa: E402
from diptych.backends.mlx.repack import (  # noqa: E402
    EXACT_BITS, REQUANT_BITS, measure_error, pack_codes, repack_tensor, stored_values,
    unpack_codes)
from diptych.quant import QuantTensor  # noqa: E402
from diptych.quant.gguf_file import GGUFFile  # noqa: E402

EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.IQ4_NL]
REQUANT = [T.Q6_K, T.Q3_K, T.Q2_K]
# byte offsets of each type's fp16 scale fields (d, m, dmin)
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.IQ4_NL: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q3_K: [108],
              T.Q2_K: [80, 82]}
# measured worst cases over these random blocks (see test ids), with headroom; the
# requantized types' guarantee is |err| <= |s_big| / (2M) per group (repack docstring)
REQUANT_RMS_REL = {T.Q6_K: 6e-3, T.Q3_K: 2e-2, T.Q2_K: 2.5e-2}


def random_tensor(ggml_type, rows=48, cols=512, seed=0, scale=0.01):
    """Random blocks whose fp16 scale fields are finite (normal * scale, either sign)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[ggml_type]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS.get(ggml_type, []):
        d = (rng.standard_normal(len(data)) * scale).astype(np.float16)
        data[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return QuantTensor("w", ggml_type, (rows, cols), data.reshape(rows, -1))


def dense_tensor(ggml_type, rows=24, cols=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if ggml_type == T.F16:
        raw = x.astype(np.float16).view(np.uint8)
    elif ggml_type == T.BF16:
        raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = x.view(np.uint8)
    return QuantTensor("w", ggml_type, (rows, cols), raw.reshape(rows, -1))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_reproduces_mlx_quantize(bits):
    w = mx.array(np.random.default_rng(bits).standard_normal((8, 256)).astype(np.float32))
    packed, _, _ = mx.quantize(w, group_size=32, bits=bits)
    packed = np.array(packed)
    codes = unpack_codes(packed, bits)
    assert codes.max() < 2 ** bits and codes.shape == (8, 256)
    assert np.array_equal(pack_codes(codes, bits), packed)


@pytest.mark.parametrize("ggml_type", EXACT, ids=lambda t: t.name)
def test_exact_types_dequantize_bit_exactly_with_fp32_scales(ggml_type):
    qt = random_tensor(ggml_type)
    w = repack_tensor(qt, scale_dtype="float32")
    assert w.exact and w.bits == EXACT_BITS[ggml_type] and w.scales.dtype == mx.float32
    got = np.array(w.dequantize(mx.float32))
    assert np.array_equal(got, qt.dequantize())  # bit-exact (0 ulp)
    assert np.array_equal(stored_values(w), qt.dequantize())


@pytest.mark.parametrize("ggml_type", REQUANT, ids=lambda t: t.name)
def test_requantized_types_stay_within_their_bound(ggml_type):
    qt = random_tensor(ggml_type)
    w = repack_tensor(qt, scale_dtype="float32")
    assert not w.exact and w.bits == REQUANT_BITS[ggml_type]
    err = np.abs(np.array(w.dequantize(mx.float32)) - qt.dequantize())
    r = measure_error(qt)
    assert r["rms_rel"] < REQUANT_RMS_REL[ggml_type]
    assert err.max() == pytest.approx(r["max_abs"], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("ggml_type", REQUANT, ids=lambda t: t.name)
def test_requantized_error_per_group_meets_the_documented_bound(ggml_type):
    from diptych.backends.mlx.repack import _subgroup_affine
    from diptych.quant.dequant import as_blocks

    qt = random_tensor(ggml_type, rows=32, cols=1024, seed=4)
    bits = REQUANT_BITS[ggml_type]
    s, _, qlo, qhi = _subgroup_affine(ggml_type, as_blocks(qt.data, ggml_type))
    levels = 2 ** bits - 1
    mult = 2 ** int(np.floor(np.log2(levels // (qhi - qlo))))
    s_big = np.abs(s.reshape(-1, 2)).max(axis=1).astype(np.float64)
    ref = qt.dequantize().reshape(-1, 32).astype(np.float64)
    got = np.array(repack_tensor(qt).dequantize(mx.float32)).reshape(-1, 32)
    err = np.abs(got - ref).max(axis=1)
    span = ref.max(axis=1) - ref.min(axis=1)
    bound = np.maximum(s_big / (2 * mult), span / (2 * levels)) * (1 + 1e-5) + 1e-7
    assert (err <= bound).all()
    # the anchored grid is the common case (random Q2_K mins fall back more often)
    share = (err <= s_big / (2 * mult) * (1 + 1e-5) + 1e-7).mean()
    assert share > (0.7 if ggml_type == T.Q2_K else 0.95)


def test_q6_k_with_equal_sub_block_scales_is_exact():
    qt = random_tensor(T.Q6_K)
    data = qt.data.reshape(-1, 210).copy()
    data[:, 192:208] = 7  # every sub-block scale equal
    qt = QuantTensor("w", T.Q6_K, qt.shape, data.reshape(qt.data.shape))
    w = repack_tensor(qt)
    assert np.array_equal(np.array(w.dequantize(mx.float32)), qt.dequantize())


@pytest.mark.parametrize("ggml_type", EXACT + REQUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("scale_dtype,bound", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_scales_error_is_bounded(ggml_type, scale_dtype, bound):
    """Rounding the scale and bias to fp16/bf16 (Metal): measured max abs error relative to
    max|w| (legacy types: ~0 for fp16, d is already fp16; K-quants: d*sc rounds)."""
    qt = random_tensor(ggml_type)
    r = measure_error(qt, scale_dtype=scale_dtype)
    base = measure_error(qt, scale_dtype="float32")
    assert r["max_rel"] <= base["max_rel"] + bound
    if scale_dtype == "float16" and ggml_type in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                                                  T.IQ4_NL):
        assert r["exact"]  # fp16 d, m and -8d/-16d/-128d are representable exactly
    w = repack_tensor(qt, scale_dtype=scale_dtype)
    assert w.scales.dtype == getattr(mx, scale_dtype) and w.biases.dtype == w.scales.dtype


def test_half_scales_that_would_overflow_stay_fp32():
    qt = random_tensor(T.Q8_0)
    data = qt.data.reshape(-1, 34).copy()
    data[:, 0:2] = np.array([1000.0], np.float16).view(np.uint8)  # -128 d = -128000
    qt = QuantTensor("w", T.Q8_0, qt.shape, data.reshape(qt.data.shape))
    w = repack_tensor(qt, scale_dtype="float16")
    assert w.scales.dtype == mx.float32 and "overflow" in w.layout
    assert np.array_equal(np.array(w.dequantize(mx.float32)), qt.dequantize())


def test_half_scale_exactness_is_checked_on_the_data():
    assert repack_tensor(random_tensor(T.Q4_1), scale_dtype="float16").exact
    k = repack_tensor(random_tensor(T.Q4_K), scale_dtype="float16")
    assert not k.exact and "scales rounded to fp16" in k.layout


@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_stay_dense(ggml_type):
    qt = dense_tensor(ggml_type)
    w = repack_tensor(qt)
    assert not w.quantized and "dense" in w.layout
    assert np.array_equal(np.array(w.dequantize(mx.float32)), qt.dequantize())


@pytest.mark.parametrize("ggml_type", EXACT + REQUANT + [T.F16], ids=lambda t: t.name)
def test_linear_and_embed_match_the_reference(ggml_type):
    be = MLXBackend()
    qt = dense_tensor(ggml_type) if ggml_type == T.F16 else random_tensor(ggml_type, rows=40)
    w = be.prepare(qt)
    ref_w = np.array(w.dequantize(mx.float32)).astype(np.float64)
    k = qt.shape[1]
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    bias = np.random.default_rng(2).standard_normal(qt.shape[0]).astype(np.float32)
    y = be.to_numpy(be.linear(mx.array(x), w, be.prepare_vector(bias)))
    want = x.astype(np.float64) @ ref_w.T + bias
    assert y.shape == (2, 3, qt.shape[0])
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()

    ids = np.array([[3, 0, 39 % qt.shape[0]], [5, 5, 1]])
    rows = be.to_numpy(be.embed(w, be.ids(ids)))
    assert rows.shape == (2, 3, k)
    assert np.array_equal(rows, qt.dequantize()[ids] if w.exact or not w.quantized
                          else ref_w.astype(np.float32)[ids])
    assert be.weight_bytes(w) == w.nbytes > 0
    assert ggml_type.name in be.weight_layout(w)


def test_repack_works_in_row_chunks(monkeypatch):
    from diptych.backends.mlx import repack as rp

    qt = random_tensor(T.Q5_K, rows=37, cols=768)
    whole = np.array(repack_tensor(qt).dequantize())
    monkeypatch.setattr(rp, "CHUNK_ELEMENTS", 768 * 5)  # 5 rows a chunk, a ragged tail
    assert np.array_equal(np.array(repack_tensor(qt).dequantize()), whole)


def test_layout_and_size_report():
    w = repack_tensor(random_tensor(T.Q4_1))
    assert w.layout == "Q4_1 -> affine 4-bit g32, fp32 scale+bias (exact)"
    assert w.bits_per_weight == 6.0  # 4 + 2*32/32
    w16 = repack_tensor(random_tensor(T.Q4_0), scale_dtype="float16")
    assert w16.bits_per_weight == 5.0


# -- one tensor of each type in the real models -------------------------------------------

def _first_of_each_type(path):
    f = GGUFFile(path)
    out = {}
    for name, t in f.tensors.items():
        if len(t.shape) == 2 and t.type_name not in out:
            out[t.type_name] = t
    return out


@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path"])
def test_real_model_tensors(model, request):
    tensors = _first_of_each_type(request.getfixturevalue(model))
    assert tensors
    for type_name, qt in tensors.items():
        qt = qt.take_rows(np.arange(min(qt.shape[0], 256)))
        r = measure_error(qt)
        if T[type_name] in EXACT_BITS or T[type_name] in (T.F32, T.F16, T.BF16):
            assert r["exact"], (type_name, r)
        else:
            assert r["rms_rel"] < 1e-2 and r["max_rel"] < 1e-2, (type_name, r)
        r16 = measure_error(qt, scale_dtype="float16")
        assert r16["max_rel"] <= r["max_rel"] + 1e-3, (type_name, r16)
