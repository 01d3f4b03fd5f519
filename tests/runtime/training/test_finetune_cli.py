"""`diptych finetune` end to end on a tiny model: a run stopped by a real SIGINT and resumed
ends with the same adapter, bit for bit, as an uninterrupted run; option and data errors."""

import json
import os
import signal
import subprocess
import sys

import pytest

from diptych.cli.main import main

from ...tiny_models import tiny_hf_model, write_gguf

WORDS = "the cat sat on a mat and the dog ran to the red house by the sea".split()
ARGS = ["--steps", "60", "--batch-size", "2", "--rank", "2", "--learning-rate", "0.01",
        "--seed", "5", "--save-every", "1000"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = write_gguf(tiny_hf_model("llama", seed=2), "llama", root / "m.gguf")
    data = root / "data"
    data.mkdir()
    lines = [json.dumps({"prompt": " ".join(WORDS[i:i + 3]), "completion": " " + WORDS[i + 3]})
             for i in range(len(WORDS) - 3)]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (data / "test.jsonl").write_text("\n".join(lines[3:6]) + "\n")
    return model, data


def test_sigint_then_resume_ends_bit_identical(setup, tmp_path, capsys):
    model, data = setup
    assert main(["finetune", str(model), "--data", str(data), "--out", str(tmp_path / "whole"),
                 "--test", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "trained 60 steps" in printed and "test loss" in printed and "perplexity" in printed

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diptych.cli", "finetune", str(model), "--data", str(data),
         "--out", str(cut), *ARGS], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    for line in proc.stderr:
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130
    assert "checkpoint saved" in rest and f"--resume {cut}" in rest
    assert "Traceback" not in rest
    assert main(["finetune", str(model), "--data", str(data), "--resume", str(cut),
                 "--steps", "60"]) == 0
    for name in ("adapter_model.safetensors", "adapter.gguf", "checkpoint.safetensors"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_bad_options_and_data_are_one_line_errors(setup, tmp_path, capsys):
    model, data = setup
    assert main(["finetune", str(model), "--data", str(data), "--out", str(tmp_path),
                 "--rank", "0"]) == 1
    assert "rank must be an integer >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["finetune", str(model), "--data", str(bad), "--out", str(tmp_path)]) == 1
    assert "bad.jsonl, line 2: expected the keys" in capsys.readouterr().err
    assert main(["finetune", str(model), "--data", str(data), "--resume", str(tmp_path)]) == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_without_a_model_the_embedded_default_is_trained(smollm2_path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"   # read with the model's tokenizer, after the model loads
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["finetune", "--data", str(bad), "--out", str(tmp_path / "a")]) == 1
    assert "bad.jsonl, line 2: expected the keys" in capsys.readouterr().err


def test_eval_every_without_validation_data_says_so(setup, tmp_path, caplog):
    model, data = setup
    args = ["finetune", str(model), "--data", str(data / "train.jsonl"), "--steps", "2",
            "--rank", "2", "--eval-every", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "no validation data" in caplog.text
    caplog.clear()
    assert main([*args, "--out", str(tmp_path / "b"), "--valid", str(data / "valid.jsonl")]) == 0
    assert "no validation data" not in caplog.text
