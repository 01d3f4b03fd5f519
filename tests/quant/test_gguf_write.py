"""The GGUF writer: a file llama.cpp's converter wrote, rewritten, keeps every value, type
and tensor byte; conversion to each type matches gguf-py's quantizers."""

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from diptych.quant.gguf_file import GGUFFile
from diptych.quant.gguf_write import WRITE_TYPES, write_gguf

FIXTURES = Path(__file__).parent.parent / "fixtures" / "convert"


@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek_v3"])
def test_rewrite_keeps_values_types_and_bytes(tmp_path, family):
    src = GGUFFile(FIXTURES / family / "llama.cpp.gguf")
    metadata = {k: src.metadata[k] for k in src.metadata}
    out = GGUFFile(write_gguf(tmp_path / "m.gguf", metadata, src.tensors))
    assert list(out.metadata) == list(src.metadata)
    for key in src.metadata:
        assert out.metadata.value_type(key) == src.metadata.value_type(key), key
        assert out.metadata.element_type(key) == src.metadata.element_type(key), key
        assert np.array_equal(np.asarray(out.metadata[key]), np.asarray(src.metadata[key])), key
    assert list(out.tensors) == list(src.tensors)
    for name, t in src.tensors.items():
        assert (out.tensors[name].shape, out.tensors[name].ggml_type) == (t.shape, t.ggml_type)
        assert np.array_equal(out.tensors[name].data, t.data), name


@pytest.mark.parametrize("to", WRITE_TYPES)
def test_converted_matrices_equal_gguf_py(tmp_path, to):
    src = GGUFFile(FIXTURES / "llama" / "llama.cpp.gguf")
    metadata = {k: src.metadata[k] for k in src.metadata}
    out = GGUFFile(write_gguf(tmp_path / "m.gguf", metadata, src.tensors, to))
    assert out.metadata["general.file_type"] == {T.F32: 0, T.F16: 1, T.BF16: 32, T.Q8_0: 7,
                                                 T.Q4_0: 2, T.Q4_1: 3, T.Q5_0: 8, T.Q5_1: 9}[to]
    w = src.tensors["blk.0.ffn_up.weight"]
    got = out.tensors["blk.0.ffn_up.weight"]
    assert got.ggml_type == to and got.shape == w.shape
    want = gguf.quants.quantize(w.dequantize(), to)
    assert np.array_equal(got.data.reshape(-1), np.asarray(want).view(np.uint8).reshape(-1))
    assert out.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32
