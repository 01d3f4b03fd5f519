"""Compatibility with llama.cpp both ways, on fixtures from scripts/make_convert_fixtures.py.

Each tests/fixtures/convert/<family>/ holds a tiny float16 Hugging Face folder, the GGUF file
llama.cpp's own converter wrote from it, and llama.cpp's logits on the files diptych's
converter writes (with a digest of their tensor data, so a changed converter or fixture
shows as such rather than as a numeric mismatch).
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest

import diptych
from diptych.sources.convert import convert
from diptych.sources.hf_folder import HFSource
from diptych.quant.gguf_file import GGUFFile

from ..tiny_models import FAMILIES, logits

FIXTURES = Path(__file__).parent.parent / "fixtures" / "convert"
# metadata diptych's converter writes and llama.cpp's does not (llama.cpp reads the first two)
EXTRA_KEYS = {"gemma3.attention.sliding_window_pattern", "deepseek2.expert_gating_func",
              "llama.attention.sliding_window", "qwen3moe.expert_weights_norm"}
# llama.cpp's GELU goes through a float16 lookup table: Gemma 3's logits move by ~2e-3
LLAMA_CPP_BOUND = {"gemma3": 4e-3}
# ... and its 8-bit activations in Q8_0 dot products grow through Gemma 3's six layers here
LLAMA_CPP_Q8_BOUND = {"gemma3": 0.2}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _same(a, b) -> bool:
    if isinstance(a, (np.ndarray, list)):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, float):
        return np.float32(a) == np.float32(b)
    return a == b


def test_source_equals_llama_cpp_converter(family):
    """Our HF source gives llama.cpp's converter's tensors (names, shapes, types, values,
    after its transforms) and its metadata."""
    folder = FIXTURES / family
    ours, theirs = HFSource(folder), GGUFFile(folder / "llama.cpp.gguf")
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for name, t in theirs.tensors.items():
        mine = ours.tensors[name]
        assert (mine.shape, mine.type_name) == (t.shape, t.type_name), name
        assert np.array_equal(mine.dequantize(), t.dequantize()), name
    skip = {"general.name", "general.type", "general.size_label", "general.file_type",
            "general.quantization_version"}
    for key in set(theirs.metadata) - skip:
        assert key in ours.metadata, key
        assert _same(ours.metadata[key], theirs.metadata[key]), key
    assert set(ours.metadata) - set(theirs.metadata) - {"general.name"} <= EXTRA_KEYS


def test_llama_cpp_file_loads_and_matches_transformers(family):
    folder = FIXTURES / family
    ids = [int(i) for i in np.load(folder / "expected.npz")["ids"]]
    model = diptych.load(folder / "llama.cpp.gguf", backend="torch", n_ctx=64)
    assert _rel(model.logits(ids), logits(_hf_model(folder), ids)) <= 1e-4


def _digest(path: Path) -> str:
    with GGUFFile(path) as f:
        start = f.data_offset
    return hashlib.sha256(path.read_bytes()[start:]).hexdigest()


@pytest.mark.parametrize("type_", ["F32", "Q8_0"])
def test_llama_cpp_runs_our_files(tmp_path, family, type_):
    """llama.cpp's logits on our converted file (stored) match diptych's on the same file:
    F32 at fp32 accuracy; Q8_0, where llama.cpp also rounds activations to 8 bits, within
    5% of the largest logit (Gemma 3: 20%) at 90% of positions, and on the same top-1 token
    at 90% of the positions where llama.cpp's top two are not tied."""
    folder = FIXTURES / family
    expected = np.load(folder / "expected.npz")
    path = convert(folder, tmp_path / "m.gguf", type_)
    assert _digest(path) == str(expected[f"digest_{type_}"]), (
        "the converted file differs from the one llama.cpp ran: regenerate the fixtures with "
        "scripts/make_convert_fixtures.py")
    ids = [int(i) for i in expected["ids"]]
    ours = diptych.load(path, backend="torch", n_ctx=64).logits(ids)
    theirs = expected[f"lcpp_logits_{type_}"]
    if type_ == "F32":
        assert _rel(ours, theirs) <= LLAMA_CPP_BOUND.get(family, 1e-4)
    else:
        # a router near-tie can pick another expert under llama.cpp's 8-bit activations
        per_position = np.abs(ours - theirs).max(-1) / np.abs(theirs).max()
        assert (per_position <= LLAMA_CPP_Q8_BOUND.get(family, 0.05)).mean() >= 0.9
        top2 = np.sort(theirs, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.02 * np.abs(theirs).max()  # not a near-tie
        assert clear.mean() >= 0.5
        assert (ours.argmax(-1) == theirs.argmax(-1))[clear].mean() >= 0.9
