"""diptych's importance matrix of SmolLM2 against llama.cpp's own `llama-imatrix` on the
same file and text (tests/fixtures/imatrix_smollm2_llama_cpp.gguf, from
scripts/make_llama_imatrix_fixture.py): the same entries, counts and layout, and values
that differ only as far as llama.cpp's 8-bit rounding of activations moves them (it rounds
each matrix product's input, so every later layer's input differs slightly from an exact
fp32 evaluation); quantizing with either file gives the same blocks almost everywhere and
the same weighted error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import diptych
from diptych.inference.imatrix import Imatrix, collect_imatrix
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.quantize import quantize_rows
from gguf.quants import dequantize

from ..quant.quantize_cases import weighted_error

pytestmark = pytest.mark.real

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Measured (2026-11-30): relative L2 difference of an entry's sums at most 0.024, median
# 0.0013; 83-99% of the blocks alike, weighted errors within 0.2%.
REL_MAX, REL_MEDIAN = 0.05, 0.005
SAME_BLOCKS = 0.75


@pytest.fixture(scope="module")
def both(smollm2_path):
    ref = Imatrix.load(FIXTURES / "imatrix_smollm2_llama_cpp.gguf")
    tokens = json.loads((FIXTURES / "perplexity_smollm2.json").read_text())["tokens"]
    model = diptych.load(smollm2_path, backend="torch", n_ctx=ref.chunk_size)
    n = ref.chunk_count * ref.chunk_size
    return collect_imatrix(model, tokens[:n], ref.chunk_size), ref


def test_same_entries_counts_and_layout(both, tmp_path):
    ours, ref = both
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    assert sorted(ours.entries) == sorted(ref.entries)
    assert len(ref.entries) == 30 * 7          # q, k, v, output, gate, up, down per layer
    for name, (sums, counts) in ref.entries.items():
        assert ours.entries[name][0].shape == sums.shape, name
        assert ours.entries[name][1].tolist() == counts.tolist(), name
    ours.save(tmp_path / "ours.gguf", "llama")
    back = Imatrix.load(tmp_path / "ours.gguf")
    assert sorted(back.entries) == sorted(ref.entries)


def test_llama_cpp_files_importance_is_llama_quantizes(tmp_path):
    """The importance read from llama.cpp's file is llama-quantize's: sum / count in
    float32, so our quantizer given it writes llama-quantize's blocks."""
    import gguf

    r = gguf.GGUFReader(FIXTURES / "imatrix_smollm2_llama_cpp.gguf")
    tensors = {t.name: t for t in r.tensors}
    im = Imatrix.load(FIXTURES / "imatrix_smollm2_llama_cpp.gguf")
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        sums = np.asarray(tensors[f"{name}.in_sum2"].data, np.float32).reshape(1, -1)
        counts = np.asarray(tensors[f"{name}.counts"].data, np.float32).reshape(-1, 1)
        np.testing.assert_array_equal(im.importance(name), sums / counts)


def test_values_agree(both):
    ours, ref = both
    rel = {name: np.linalg.norm(ours.entries[name][0] - sums) / np.linalg.norm(sums)
           for name, (sums, _) in ref.entries.items()}
    assert max(rel.values()) < REL_MAX, max(rel.items(), key=lambda kv: kv[1])
    assert np.median(list(rel.values())) < REL_MEDIAN


@pytest.mark.parametrize("name, type", [("blk.0.ffn_down.weight", T.Q4_K),
                                        ("blk.10.ffn_down.weight", T.Q6_K),
                                        ("blk.5.attn_q.weight", T.Q5_0),
                                        ("blk.20.ffn_gate.weight", T.Q4_0)])
def test_quantizing_with_either_gives_mostly_the_same_blocks_and_error(both, smollm2_path, name,
                                                                      type):
    ours, ref = both
    x = GGUFFile(smollm2_path).tensors[name].dequantize()
    a, b = (quantize_rows(x, type, im.importance(name)[0]) for im in (ours, ref))
    block = {T.Q4_K: 144, T.Q6_K: 210, T.Q5_0: 22, T.Q4_0: 18}[type]
    same = (a.reshape(-1, block) == b.reshape(-1, block)).all(1).mean()
    assert same > SAME_BLOCKS, same
    qw = ref.importance(name)[0]
    err_a, err_b = (weighted_error(x, dequantize(q, type).reshape(x.shape), qw) for q in (a, b))
    assert err_a == pytest.approx(err_b, rel=0.01)
