"""The training loss and LoRA gradients against transformers + PEFT.

Tiny random llama, qwen2 and gemma3 models (dimensions divisible by 256, so K-quants stay
K-quants), written to GGUF in F32 and quantized; transformers runs the same weights as
gguf-py dequantizes them. Both sides start from the same non-zero random A and B (PEFT's
B = 0 would make the gradient of A zero and the check weak), take the same prompt-masked
batch of two sequences of different lengths, and make 3 SGD steps, each with its own
gradients: the loss and every gradient of A and B agree at each step (the step itself
is the reference's, applied to both, so every step starts both sides at the same point).
The F32 cases train with gradient checkpointing: layers and pieces of the output head are
recomputed in the backward pass.
"""

import numpy as np
import pytest
import torch

from diptych.load_plan import LoadPlan
from diptych.training.data import Example
from diptych.training import loop
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions

from ...tiny_models import tiny_hf_model, write_gguf

RANK, ALPHA, LR = 4, 8.0, 0.02
DIMS = dict(hidden_size=256, intermediate_size=512)
FAMILY_DIMS = {"llama": {}, "qwen2": {}, "gemma3": dict(head_dim=64, query_pre_attn_scalar=64)}
# Q4_K_M files hold Q4_K and Q6_K matrices
CASES = [("llama", "F32"), ("llama", "Q4_K_M"), ("qwen2", "Q8_0"), ("gemma3", "Q4_K_M")]


def _batch():
    rng = np.random.default_rng(3)
    out = []
    for n, prompt in ((12, 5), (9, 3)):   # gemma3's window is 8: the longer one wraps it
        ids = rng.integers(3, 128, n)
        out.append(Example(tuple(int(i) for i in ids), (False,) * prompt + (True,) * (n - prompt)))
    return out


def _reference(family, path):
    """The transformers model (the family's own config) on gguf-py's dequantized weights."""
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model(family, seed=1, **DIMS, **FAMILY_DIMS[family])
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    hf.load_state_dict(loaded.state_dict())
    return hf


def _peft_loss(model, examples):
    """transformers + PEFT's prompt-masked mean loss over the batch (right-padded)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width)
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        mask[r, :len(e.mask)] = torch.tensor(e.mask, dtype=torch.float32)
    logp = torch.log_softmax(model(ids[:, :-1]).logits, -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family, qtype", CASES)
def test_loss_and_gradients_equal_peft_for_three_sgd_steps(tmp_path, monkeypatch, family,
                                                           qtype):
    from peft import LoraConfig, get_peft_model

    # with gradient checkpointing (the F32 cases), the head in pieces of 3 positions
    monkeypatch.setattr(loop, "HEAD_POSITIONS", 6)

    hf = tiny_hf_model(family, seed=1, **DIMS, **FAMILY_DIMS[family])
    path = write_gguf(hf, family, tmp_path / "m.gguf", qtype)
    eng = LoadPlan.open(path, "torch", n_ctx=64).engine()
    examples = _batch()
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples,
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, steps=3,
                                   grad_checkpointing=qtype == "F32"), tmp_path / "run")
    peft = get_peft_model(_reference(family, path), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    modules = dict(peft.named_modules())
    leaves = []
    rng = np.random.default_rng(11)
    for k, (layer, name) in enumerate(trainer.keys):
        block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        lora = modules[f"base_model.model.model.layers.{layer}.{block}.{name}"]
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        for j, param in enumerate((a, b)):
            value = rng.standard_normal(tuple(param.shape)).astype(np.float32) * 0.2
            with torch.no_grad():
                param.copy_(torch.from_numpy(value))
            trainer.params[2 * k + j] = eng.backend.tensor(value)
            leaves.append(param)
    assert len(leaves) == 2 * 7 * 2
    for step in range(3):
        loss, grads, _ = trainer.gradients(step)
        for p in leaves:
            p.grad = None
        want = _peft_loss(peft, examples)
        want.backward()
        assert abs(loss - float(want)) <= 1e-4 * abs(float(want))
        for g, p in zip(grads, leaves):
            assert _rel(eng.backend.to_numpy(g), p.grad.numpy()) <= 1e-4
        # one SGD step, the same on both sides, so each step compares at the same point
        with torch.no_grad():
            for p in leaves:
                p -= LR * p.grad
        trainer.params = [eng.backend.tensor(p.detach().numpy()) for p in leaves]
