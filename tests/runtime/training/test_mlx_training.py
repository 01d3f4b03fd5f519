"""Training on MLX (mx.value_and_grad over the adapter arrays) gives the losses and AdamW
updates of the torch backend, which the PEFT oracle checks."""

import numpy as np
import pytest

from diptych.load_plan import LoadPlan
from diptych.training import loop
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions

from ...tiny_models import tiny_hf_model, write_gguf

pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_gguf(tiny_hf_model("qwen2", seed=9), "qwen2",
                      tmp_path_factory.mktemp("mlx") / "m.gguf", "Q8_0")


def _trainer(path, backend, out, checkpointing=True, dropout=0.0):
    eng = LoadPlan.open(path, backend, n_ctx=32).engine()
    rng = np.random.default_rng(4)
    examples = [Example(tuple(int(i) for i in rng.integers(3, 128, n)),
                        (False,) * 3 + (True,) * (n - 3)) for n in (9, 12)]
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples, TrainOptions(
        rank=4, batch_size=2, steps=2, learning_rate=0.05, weight_decay=0.1, dropout=dropout,
        grad_checkpointing=checkpointing, compute_dtype="fp32"), out)
    values = np.random.default_rng(5)
    trainer.params = [eng.backend.tensor(values.standard_normal(
        eng.backend.to_numpy(p).shape).astype(np.float32) * 0.2) for p in trainer.params]
    return trainer


def test_mlx_training_steps_equal_torch(path, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)   # the head in pieces
    ours, ref = (_trainer(path, b, tmp_path / b) for b in ("mlx", "torch"))
    for trainer in (ours, ref):
        trainer.run()
    assert ours.history["train"] == pytest.approx(ref.history["train"], rel=1e-5)
    for a, b in zip(ours.params, ref.params):
        a, b = ours.be.to_numpy(a), ref.be.to_numpy(b)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_mlx_checkpointing_recomputes_each_layer_and_keeps_the_gradients(path, tmp_path,
                                                                        monkeypatch):
    """With checkpointing every layer runs again in the backward pass (the adapters are the
    checkpointed function's inputs, so their gradients survive), and the loss and every
    gradient equal those of the run that keeps its activations (dropout on: a recomputed
    layer draws its forward pass's masks)."""
    from diptych.model import graph

    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)
    runs, block = [], graph._block

    def counted(*args):
        runs.append(args[4])   # the layer's index
        return block(*args)

    monkeypatch.setattr(graph, "_block", counted)
    results = {}
    for checkpointing in (False, True):
        trainer = _trainer(path, "mlx", tmp_path / str(checkpointing), checkpointing, 0.2)
        runs.clear()
        loss, grads, _ = trainer.gradients(0)
        layers = trainer.cfg.n_layers
        assert sorted(runs) == sorted(list(range(layers)) * (2 if checkpointing else 1))
        results[checkpointing] = loss, [trainer.be.to_numpy(g) for g in grads]
    (plain, plain_grads), (ck, ck_grads) = results[False], results[True]
    assert ck == pytest.approx(plain, rel=1e-6)
    assert all(np.abs(g).max() > 0 for g in plain_grads)
    for a, b in zip(ck_grads, plain_grads):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_mlx_dropout_mask_is_the_seed_s_and_scales_what_it_keeps():
    import mlx.core as mx

    from diptych.backends import select

    be = select("mlx", "cpu")
    x = mx.array(np.random.default_rng(0).standard_normal((4, 64, 96)).astype(np.float32))
    out = np.array(be.dropout(x, 0.25, 7))
    kept = out != 0
    assert np.array_equal(out[kept], (np.array(x) / 0.75)[kept])
    assert abs(kept.mean() - 0.75) < 0.01   # of 24576 draws
    assert np.array_equal(np.array(be.dropout(x, 0.25, 7)), out)
    assert not np.array_equal(np.array(be.dropout(x, 0.25, 8)) != 0, kept)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mlx_loss_piece_gradient_equals_autograd_of_the_loss(qtype):
    """The loss piece's gradient in h, computed with its value (a custom vjp), equals
    mx.value_and_grad of the plain loss, with and without a final softcap; outside
    differentiation (`inference()`) the value alone is computed, the same value."""
    import gguf
    import mlx.core as mx
    from gguf import GGMLQuantizationType as T

    from diptych.backends.mlx.backend import MLXBackend, _log_likelihood
    from diptych.quant import QuantTensor

    be = MLXBackend(device="cpu")
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((96, 64)).astype(np.float32)
    data = w32 if qtype == "F32" else gguf.quants.quantize(w32, T.Q8_0)
    w = be.prepare(QuantTensor("output.weight", T[qtype], (96, 64), data))
    h = mx.array(rng.standard_normal((7, 64)).astype(np.float32))
    targets = mx.array(rng.integers(0, 96, 7))
    weights = mx.array(rng.random(7).astype(np.float32))
    for cap in (0.0, 3.0):
        value, grad = mx.value_and_grad(
            lambda x: be.token_log_likelihood(x, w, targets, weights, cap))(h)
        want, want_grad = mx.value_and_grad(
            lambda x: _log_likelihood(be, x, w, targets, weights, cap, grad=False)[0])(h)
        assert float(value) == pytest.approx(float(want), rel=1e-6)
        assert float(mx.abs(grad - want_grad).max()) <= 1e-5 * float(mx.abs(want_grad).max())
        with be.inference():
            assert float(be.token_log_likelihood(h, w, targets, weights, cap)) == float(value)
