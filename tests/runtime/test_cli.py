"""The `diptych` command line, run as a user runs it (a subprocess) on the default model."""

import subprocess
import sys

import pytest


def diptych(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "diptych.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def default_model(smollm2_path):
    return smollm2_path


def test_info_describes_the_model():
    out = diptych("info")
    assert out.returncode == 0, out.stderr
    for text in ("llama", "134.5 M", "8192", "Q4_1", "Q8_0", "KV cache", "attn_q.weight",
                 "layouts on the torch"):
        assert text in out.stdout
    out = diptych("info", "--backend", "mlx")
    assert out.returncode == 0, out.stderr
    assert "Q4_1 -> affine 4-bit g32" in out.stdout
    out = diptych("info", "--backend", "torch", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "layouts on the torch (cpu) backend" in out.stdout


def test_run_streams_an_answer():
    out = diptych("run", "--raw", "The capital of France is", "--max-tokens", "8",
                  "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "tok/s" in out.stderr


def test_bad_input_is_one_line_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    for args in (["info", str(bad)], ["run", str(tmp_path / "none.gguf"), "hi"],
                 ["run", "--temperature", "-1", "hi"], ["chat", str(tmp_path / "none.gguf")],
                 ["chat", "--top-p", "0"], ["chat", "--backend", "nope"],
                 ["info", "--backend", "torch", "--device", "gpu"],
                 ["run", "--device", "metal", "hi"]):
        out = diptych(*args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith("diptych: error:") and "Traceback" not in out.stderr


def test_bench_prints_speeds_and_memory():
    out = diptych("bench", "--prompt-tokens", "32", "--gen-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "prefill" in out.stdout and "decode" in out.stdout and "peak RSS" in out.stdout
