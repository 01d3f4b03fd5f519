"""The numpy quantizers: what they write decodes (gguf-py) to what they meant, their error search
beats plain min/max rounding, and their error is llama.cpp's (committed fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from diptych.errors import InvalidArgumentError, UnsupportedModelError
from diptych.quant.dequant import dequantize_rows
from diptych.quant.formats import FORMATS
from diptych.quant.quantize import QUANTIZERS, quantize_rows

from .quantize_cases import CASES, COMPARED_TYPES, RealCase, SyntheticCase, digest, relative_error

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "quantize_llama_cpp.json"
K_TYPES = tuple(QUANTIZERS)


def _decode(blocks, t, shape):
    return gguf.quants.dequantize(blocks, t).reshape(shape)


def _inputs():
    rng = np.random.default_rng(7)
    x = (rng.standard_t(4, (16, 512)) * 0.03).astype(np.float32)
    x[1] = 0                               # an all-zero row
    x[2, :256] = 0                         # an all-zero super-block
    x[3, 32:64] = 0.5                      # a constant sub-block
    x[4] = np.abs(x[4])                    # one-signed rows
    x[5] = -np.abs(x[5])
    x[6] *= 1e3                            # large and small magnitudes
    x[7] *= 0.05
    return x


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_py(t):
    """Decoding our bytes with gguf-py gives the values our codes and scales stand for, our
    own decoder agrees bit for bit, and requantizing the decoded values is a fixed point
    for the lossless parts (zeros stay zeros)."""
    x = _inputs()
    blocks = quantize_rows(x, t)
    assert blocks.shape == (x.shape[0], FORMATS[t].row_bytes(x.shape[1]))
    y = _decode(blocks, t, x.shape)
    np.testing.assert_array_equal(dequantize_rows(blocks, t, x.shape[1]), y)
    assert np.isfinite(y).all()
    assert not y[1].any() and not y[2, :256].any()
    for row in (0, 3, 4, 5, 6, 7):  # relative error per row: scale-free, small
        assert relative_error(x[row], y[row]) < {T.Q2_K: 0.2, T.Q3_K: 0.06}.get(t, 0.02), row


def _minmax_error(x, t):
    """Error of plain rounding: per sub-block min/max (or absmax) scale, round to nearest,
    scales kept in float32 (generous to the baseline)."""
    fmt = FORMATS[t]
    unit = fmt.unit
    xs = x.reshape(-1, unit).astype(np.float64)
    levels = 2 ** fmt.code_bits - 1
    if t == T.IQ4_NL:
        book = fmt.codebook.astype(np.float64)
        d = np.abs(xs).max(1, keepdims=True) / 127
        d[d == 0] = 1
        idx = np.abs(xs[:, :, None] / d[:, :, None] - book).argmin(-1)
        y = book[idx] * d
    elif fmt.has_bias:
        lo, hi = np.minimum(xs.min(1, keepdims=True), 0), xs.max(1, keepdims=True)
        s = (hi - lo) / levels
        s[s == 0] = 1
        y = np.clip(np.rint((xs - lo) / s), 0, levels) * s + lo
    else:
        half = 2 ** (fmt.code_bits - 1)
        s = np.abs(xs).max(1, keepdims=True) / half
        s[s == 0] = 1
        y = np.clip(np.rint(xs / s), -half, half - 1) * s
    return relative_error(x.reshape(-1, unit), y)


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_error_lower_than_min_max_rounding(t):
    """The search beats plain rounding even though the baseline keeps its scales in float32
    while ours are stored in 4/6/8 bits under an fp16 super-scale."""
    x = SyntheticCase("student-t3", 11).values()
    ours = relative_error(x, _decode(quantize_rows(x, t), t, x.shape))
    assert ours < _minmax_error(x, t)


def test_bad_input_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="multiple of 256"):
        quantize_rows(np.ones((2, 100), np.float32), T.Q4_K)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        quantize_rows(np.full((1, 256), np.nan, np.float32), T.Q6_K)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        quantize_rows(np.ones((1, 256), np.float32), T.IQ2_XXS)


def test_legacy_types_are_gguf_py():
    x = _inputs()
    np.testing.assert_array_equal(quantize_rows(x, T.Q5_1).reshape(-1),
                                  gguf.quants.quantize(x, T.Q5_1).reshape(-1))


@pytest.fixture(scope="module")
def model_paths(smollm2_path, qwen_path, gemma3_path):
    return {"smollm2": smollm2_path, "qwen2": qwen_path, "gemma3": gemma3_path}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_error_at_most_llama_cpp(case, request):
    """Per tensor and type, our relative squared error <= 1.01 x that of ggml's quantizer on
    the same values (tests/fixtures/quantize_llama_cpp.json); a real tensor is not compared
    in its own type, which it requantizes to almost exactly."""
    ref = json.loads(FIXTURE.read_text())["errors"][case.name]
    paths = request.getfixturevalue("model_paths") if isinstance(case, RealCase) else None
    x = case.values(paths)
    assert digest(x) == ref["sha256"], "the input differs from the one the fixture measured"
    for name in COMPARED_TYPES:
        if name in case.coarse_for:
            continue
        t = T[name]
        ours = relative_error(x, _decode(quantize_rows(x, t), t, x.shape))
        theirs = ref["llama_cpp"][name]
        assert ours <= 1.01 * theirs, f"{name}: ours {ours:.5g} vs llama.cpp {theirs:.5g}"
