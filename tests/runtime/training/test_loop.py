"""The training loop: exact resume from a checkpoint, the schedule, accumulation, options."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from diptych.errors import InvalidArgumentError
from diptych.load_plan import LoadPlan
from diptych.training import checkpoint
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions, read_config
from diptych.training.schedule import learning_rate

from ...tiny_models import tiny_hf_model, write_gguf


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_gguf(tiny_hf_model("llama", seed=4), "llama",
                      tmp_path_factory.mktemp("loop") / "m.gguf")
    return LoadPlan.open(path, "torch", n_ctx=32).engine()


def _examples(n=5):
    rng = np.random.default_rng(0)
    return [Example(tuple(int(i) for i in rng.integers(3, 128, 6 + k)),
                    (False,) * 3 + (True,) * (3 + k)) for k in range(n)]


OPTIONS = TrainOptions(rank=2, alpha=4, batch_size=2, grad_accumulation=2, steps=5,
                       warmup_steps=2, learning_rate=1e-2, weight_decay=0.01, seed=3)


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(engine, tmp_path):
    options = dataclasses.replace(OPTIONS, dropout=0.2)   # its masks are redrawn alike too

    def run(out, stop_at=None, resume=None):
        trainer = Trainer(engine.backend, engine.cfg, engine.weights, _examples(), options, out,
                          valid=_examples(2), resume=resume)

        def stop(report):
            if report.step == stop_at:
                trainer.stop()   # what Ctrl+C does
        return trainer.run(stop)

    whole = run(tmp_path / "whole")
    assert whole.steps == 5 and not whole.interrupted and len(whole.history["train"]) == 5
    cut = run(tmp_path / "cut", stop_at=2)
    assert cut.interrupted and cut.steps == 2
    # fewer steps than the checkpoint has done: refused, and the checkpoint left as it was
    with pytest.raises(InvalidArgumentError, match="at step 2, past the 1 steps"):
        Trainer(engine.backend, engine.cfg, engine.weights, _examples(),
                dataclasses.replace(options, steps=1), tmp_path / "cut",
                resume=checkpoint.load(tmp_path / "cut"))
    resumed = run(tmp_path / "cut", resume=checkpoint.load(tmp_path / "cut"))
    assert resumed.steps == 5 and resumed.history["train"] == whole.history["train"]
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "cut")
    for x, y in zip(a.params + [m for pair in a.moments for m in pair],
                    b.params + [m for pair in b.moments for m in pair]):
        assert x.tobytes() == y.tobytes()
    # it learned: B moved off zero, and the adapter files are there
    assert np.abs(a.params[1]).max() > 0
    assert {p.name for p in (tmp_path / "whole").iterdir()} >= {
        "checkpoint.safetensors", "adapter_model.safetensors", "adapter_config.json",
        "adapter.gguf"}


def test_accumulation_gives_the_gradient_of_the_whole_batch(engine, tmp_path):
    examples = _examples(4)
    one = Trainer(engine.backend, engine.cfg, engine.weights, examples,
                  TrainOptions(rank=2, batch_size=4, steps=1, seed=3), tmp_path / "a")
    two = Trainer(engine.backend, engine.cfg, engine.weights, examples,
                  TrainOptions(rank=2, batch_size=2, grad_accumulation=2, steps=1,
                                    seed=3), tmp_path / "b")
    loss1, g1, _ = one.gradients(0)
    loss2, g2, _ = two.gradients(0)
    assert abs(loss1 - loss2) < 1e-5
    for x, y in zip(g1, g2):
        assert np.abs(x.numpy() - y.numpy()).max() <= 1e-5 * np.abs(y.numpy()).max()


def test_schedule_warms_up_then_follows_a_cosine():
    rates = [learning_rate(s, 10, 1.0, 2, 0.1) for s in range(10)]
    assert rates[:2] == [0.5, 1.0] and rates[2] == 1.0 and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))
    assert learning_rate(5, 10, 1.0, 0) == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 9)))


def test_options_from_config_files_and_their_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("rank: 4\nlearning-rate: 0.001\nmodules: q_proj, v_proj\n")
    (tmp_path / "a.toml").write_text("rank = 4\nlearning_rate = 0.001\nlayers = [0, 1]\n")
    y = TrainOptions.from_mapping(read_config(tmp_path / "a.yaml"))
    assert y.rank == 4 and y.learning_rate == 0.001 and y.modules == ("q_proj", "v_proj")
    assert TrainOptions.from_mapping(read_config(tmp_path / "a.toml")).layers == (0, 1)
    with pytest.raises(InvalidArgumentError, match="unknown fine-tuning option.*rnak"):
        TrainOptions.from_mapping({"rnak": 4})
    with pytest.raises(InvalidArgumentError, match="rank must be an integer >= 1"):
        TrainOptions(rank=0)
    with pytest.raises(InvalidArgumentError, match="unknown modules"):
        TrainOptions(modules=("qkv",))
    (tmp_path / "b.toml").write_text("rank = [")
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        read_config(tmp_path / "b.toml")
    with pytest.raises(InvalidArgumentError, match="compute_dtype must be one of"):
        TrainOptions(compute_dtype="fp16")


def test_compute_dtype_auto_follows_the_cpu_and_bf16_needs_a_backend_with_it(engine, tmp_path):
    """"auto" multiplies in bf16 where the CPU does so natively (AMX or AVX-512 BF16, as
    llvmlite reads the host); DIPTYCH_CPU_BF16=0 says it does not, and "auto" keeps fp32. A
    backend without bf16 products refuses "bf16" before training starts."""
    from llvmlite import binding

    host = binding.get_host_cpu_features()
    native = bool(host.get("amx-bf16")) or bool(host.get("avx512bf16"))
    auto = Trainer(engine.backend, engine.cfg, engine.weights, _examples(), OPTIONS,
                   tmp_path / "auto")
    assert auto.compute_dtype == ("bf16" if native else "fp32")
    code = ("from diptych.backends.torch.cpu.backend import CpuBackend; "
            "print(CpuBackend().bf16_native())")
    env = {**os.environ, "DIPTYCH_CPU_BF16": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    mlx = pytest.importorskip("mlx.core")
    del mlx
    path = write_gguf(tiny_hf_model("llama", seed=4), "llama", tmp_path / "m.gguf")
    eng = LoadPlan.open(path, "mlx", n_ctx=32).engine()
    bf16 = dataclasses.replace(OPTIONS, compute_dtype="bf16")
    with pytest.raises(InvalidArgumentError, match="fp32 products only"):
        Trainer(eng.backend, eng.cfg, eng.weights, _examples(), bf16, tmp_path / "mlx")
    assert Trainer(eng.backend, eng.cfg, eng.weights, _examples(), OPTIONS,
                   tmp_path / "mlx").compute_dtype == "fp32"
