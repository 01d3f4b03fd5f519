"""Training on the CUDA backend (Triton kernels; under the interpreter on the CPU): the loss
and LoRA gradients of a quantized llama against transformers + PEFT, for two SGD steps,
as tests/runtime/training/test_peft_oracle.py checks the CPU backend."""

import torch

from diptych.backends.torch.cuda.backend import CudaBackend
from diptych.backends.torch.cuda.kernels.weight import QuantWeight
from diptych.load_plan import LoadPlan
from diptych.training import loop
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions

from ...runtime.training.test_peft_oracle import (ALPHA, DIMS, RANK, _batch, _compare_step,
                                                  _peft, _same_start)
from ...tiny_models import tiny_hf_model, write_gguf
from .conftest import DEVICE


def test_cuda_loss_and_gradients_equal_peft(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)
    path = write_gguf(tiny_hf_model("llama", seed=1, **DIMS), "llama", tmp_path / "m.gguf",
                      "Q8_0")
    eng = LoadPlan.open(path, CudaBackend(DEVICE, dtype=torch.float32), n_ctx=64).engine()
    assert all(isinstance(w, QuantWeight) for _, w in eng.weights.linears())
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, _batch(),
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, steps=2,
                                   grad_checkpointing=True), tmp_path / "run")
    peft = _peft("llama", path)
    _, leaves = _same_start(trainer, peft, eng.backend)
    for step in range(2):
        _compare_step(trainer, peft, leaves, step)
