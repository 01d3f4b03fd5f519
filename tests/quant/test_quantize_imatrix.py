"""K-quants with an importance matrix: ours against ggml's quantizer given the same
importance (tests/fixtures/imatrix_llama_cpp.json, scripts/make_imatrix_fixtures.py), and
the importance lowering the error it weighs."""

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
def test_weighted_error_at_most_llama_cpp_and_below_no_imatrix(case, request):
    fixture = json.loads(FIXTURE.read_text())
    ref = fixture["errors"][case.name]
    qw = importance()
    assert digest(qw) == fixture["importance_sha256"]
    x = case.values(request.getfixturevalue("model_paths") if isinstance(case, RealCase)
                    else None)
    assert digest(x) == ref["sha256"], "the input differs from the one the fixture measured"
    for name in IMATRIX_COMPARED_TYPES:
        t = T[name]

        def error(blocks):
            return weighted_error(x, gguf.quants.dequantize(blocks, t).reshape(x.shape), qw)
        ours, plain = error(quantize_rows(x, t, qw)), error(quantize_rows(x, t))
        theirs = ref["llama_cpp"][name]
        assert ours <= 1.01 * theirs, f"{name}: ours {ours:.5g} vs llama.cpp {theirs:.5g}"
        assert ours < 0.9 * plain, f"{name}: the importance did not lower the error it weighs"


def test_types_without_an_importance_path_ignore_it():
    x = np.random.default_rng(0).standard_t(3, (8, 1024)).astype(np.float32)
    for t in (T.Q6_K, T.Q8_0):
        np.testing.assert_array_equal(quantize_rows(x, t, importance()), quantize_rows(x, t))
