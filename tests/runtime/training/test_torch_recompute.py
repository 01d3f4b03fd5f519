"""Gradient checkpointing on the torch CPU backend (backends/torch/recompute.py): each layer
and head piece runs again in the backward pass, and the gradients are torch.utils.checkpoint's
bit for bit."""

import numpy as np
import pytest

from diptych.load_plan import LoadPlan
from diptych.training import loop
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions

from ...tiny_models import tiny_hf_model, write_gguf


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_gguf(tiny_hf_model("qwen2", seed=9), "qwen2",
                      tmp_path_factory.mktemp("recompute") / "m.gguf", "Q8_0")


def _gradients(path, out, dropout):
    eng = LoadPlan.open(path, "torch", device="cpu", n_ctx=32).engine()
    rng = np.random.default_rng(4)
    examples = [Example(tuple(int(i) for i in rng.integers(3, 128, n)),
                        (False,) * 3 + (True,) * (n - 3)) for n in (9, 12)]
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples, TrainOptions(
        rank=4, batch_size=2, steps=1, dropout=dropout, grad_checkpointing=True), out)
    values = np.random.default_rng(5)   # B non-zero: every gradient is non-trivial
    trainer.params = [eng.backend.tensor(values.standard_normal(
        eng.backend.to_numpy(p).shape).astype(np.float32) * 0.2) for p in trainer.params]
    loss, grads, _ = trainer.gradients(0)
    return trainer, loss, [trainer.be.to_numpy(g) for g in grads]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_gradients_are_torch_checkpoint_s_bit_for_bit(path, tmp_path, monkeypatch,
                                                                  dropout):
    import torch.utils.checkpoint

    from diptych.backends.torch.backend import TorchBackend
    from diptych.model import graph

    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)   # the head in pieces
    runs, block = [], graph._block

    def counted(*args):
        runs.append(args[4])   # the layer's index
        return block(*args)

    monkeypatch.setattr(graph, "_block", counted)
    trainer, loss, grads = _gradients(path, tmp_path / "ours", dropout)
    layers = trainer.cfg.n_layers
    assert sorted(runs) == sorted(list(range(layers)) * 2)   # forward, then the recompute
    assert all(np.abs(g).max() > 0 for g in grads)

    monkeypatch.setattr(TorchBackend, "checkpoint", lambda self, fn: lambda *args: (
        torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)))
    _, ref_loss, ref_grads = _gradients(path, tmp_path / "torch", dropout)
    assert loss == ref_loss
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert np.array_equal(a, b)
