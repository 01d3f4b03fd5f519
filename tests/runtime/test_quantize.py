"""`diptych quantize` / `diptych.quantize`: a tiny model with 256-divisible rows written in a
K-quant mix loads and predicts like its F32 source; bad input, a full disk and an interrupt
leave no file at the destination."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import diptych
from diptych.cli.main import main
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.mixes import ModelShape, tensor_types

from ..tiny_models import tiny_hf_model, write_gguf


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    """A 2-layer llama, d=256 (K-quant rows), F32 GGUF written by our converter."""
    hf = tiny_hf_model("llama", seed=5, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    return write_gguf(hf, "llama", tmp_path_factory.mktemp("q") / "f32.gguf")


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_mix_files_load_and_predict_like_the_source(f32_model, tmp_path):
    """Each file has the mix's per-tensor types and loads; its logits are further from the
    F32 model's the fewer bits it has (Q4_K_M's search beats gguf-py's Q4_0 rounding)."""
    ids = list(range(3, 40))
    base = diptych.load(f32_model).logits(ids)
    src = GGUFFile(f32_model)
    shape = ModelShape.from_metadata(src.metadata)
    error = {}
    for mix in ("Q8_0", "Q6_K", "Q4_K_M", "Q4_0"):
        out = diptych.quantize(f32_model, tmp_path / f"{mix}.gguf", mix)
        q = GGUFFile(out)
        want = tensor_types(mix, shape,
                            [(n, t.shape, t.ggml_type) for n, t in src.tensors.items()])
        assert {n: t.ggml_type for n, t in q.tensors.items()} == want
        logits = diptych.load(out).logits(ids)
        error[mix] = np.linalg.norm(logits - base) / np.linalg.norm(base)
    assert error["Q8_0"] < error["Q6_K"] < error["Q4_K_M"] < error["Q4_0"], error
    q4 = GGUFFile(tmp_path / "Q4_K_M.gguf")
    assert q4.metadata["general.file_type"] == 15
    assert {T.Q4_K, T.Q6_K} <= {t.ggml_type for t in q4.tensors.values()}
    assert _leftovers(tmp_path) == []


def test_cli_refuses_a_quantized_input_unless_asked(f32_model, tmp_path, capsys):
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", str(f32_model), str(q8), "--type", "Q8_0"]) == 0
    assert main(["quantize", str(q8), str(tmp_path / "a.gguf"), "--type", "Q4_K_M"]) == 1
    assert "already quantized (Q8_0)" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()
    assert main(["quantize", str(q8), str(tmp_path / "a.gguf"), "--type", "Q4_K_M",
                 "--allow-requantize"]) == 0
    assert "requantizing Q8_0" in capsys.readouterr().err
    assert GGUFFile(tmp_path / "a.gguf").metadata["general.file_type"] == 15


def test_corrupt_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert main(["quantize", str(bad), str(tmp_path / "out.gguf")]) == 1
    assert "diptych: error:" in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists() and _leftovers(tmp_path) == []


def test_interrupt_leaves_no_file(f32_model, tmp_path):
    def stop(name, done, total):
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diptych.quantize(f32_model, tmp_path / "q.gguf", "Q4_K_M", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_no_file(f32_model, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) in a child process: the write fails with a clear
    error and neither the output nor the temporary file remains."""
    script = textwrap.dedent(f"""
        import resource, sys
        from diptych.cli.main import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        sys.exit(main(["quantize", {str(f32_model)!r}, {str(tmp_path / "q.gguf")!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert "diptych: error: cannot write" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_may_not_overwrite_input(f32_model):
    with pytest.raises(diptych.InvalidArgumentError, match="overwrite"):
        diptych.quantize(f32_model, f32_model, "Q4_K_M")


def test_convert_writes_k_quant_mixes(tmp_path):
    hf = tiny_hf_model("qwen2", seed=2, hidden_size=256, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2)
    path = write_gguf(hf, "qwen2", tmp_path / "m.gguf", "Q5_K_M")
    types = {t.ggml_type for t in GGUFFile(path).tensors.values()}
    assert {T.Q5_K, T.Q6_K} <= types
