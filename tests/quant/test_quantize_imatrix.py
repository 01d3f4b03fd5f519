"""K-quants with an importance matrix: ours against ggml's quantizer given the same
importance (tests/fixtures/imatrix_llama_cpp.json, scripts/make_imatrix_fixtures.py), and
the importance lowering the error it weighs."""

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from diptych.quant.quantize import quantize_rows

from .quantize_cases import (CASES, IMATRIX_COMPARED_TYPES, RealCase, digest, importance,
                             weighted_error)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "imatrix_llama_cpp.json"


@pytest.fixture(scope="module")
def model_paths(smollm2_path, qwen_path, gemma3_path):
    return {"smollm2": smollm2_path, "qwen2": qwen_path, "gemma3": gemma3_path}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_blocks_as_llama_cpp_and_the_weighted_error_falls(case, request):
    """With the same importance, our blocks are ggml's, byte for byte (their sha256 in the
    fixture), and the error the importance weighs is lower than without it."""
    fixture = json.loads(FIXTURE.read_text())
    ref = fixture["errors"][case.name]
    qw = importance()
    assert digest(qw) == fixture["importance_sha256"]
    x = case.values(request.getfixturevalue("model_paths") if isinstance(case, RealCase)
                    else None)
    assert digest(x) == ref["sha256"], "the input differs from the one the fixture measured"
    for name in IMATRIX_COMPARED_TYPES:
        t = T[name]
        ours = quantize_rows(x, t, qw)
        assert hashlib.sha256(ours.tobytes()).hexdigest() == ref["blocks_sha256"][name], name
        if name in case.coarse_for:
            continue   # a real tensor requantizes to its own type almost exactly

        def error(blocks):
            return weighted_error(x, gguf.quants.dequantize(blocks, t).reshape(x.shape), qw)
        assert error(ours) < error(quantize_rows(x, t)), name


def test_q8_0_ignores_an_importance_and_all_zero_blocks_stay_zero():
    x = np.random.default_rng(0).standard_t(3, (8, 1024)).astype(np.float32)
    np.testing.assert_array_equal(quantize_rows(x, T.Q8_0, importance()),
                                  quantize_rows(x, T.Q8_0))
    x[:, :64] = 0
    for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        y = gguf.quants.dequantize(quantize_rows(x, t, importance()), t).reshape(x.shape)
        assert (y[:, :64] == 0).all() and np.isfinite(y).all(), t.name
