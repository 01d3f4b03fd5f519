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

import types

import numpy as np
import pytest
import torch

from diptych.load_plan import LoadPlan
from diptych.model.adapter_files import peft_module_name
from diptych.model.adapters import graph_rows
from diptych.training.data import Example
from diptych.training import loop
from diptych.training.loop import Trainer
from diptych.training.lora import dropout_seeds
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
    # with gradient checkpointing (the F32 cases), the head in pieces of 3 positions
    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)

    hf = tiny_hf_model(family, seed=1, **DIMS, **FAMILY_DIMS[family])
    path = write_gguf(hf, family, tmp_path / "m.gguf", qtype)
    eng = LoadPlan.open(path, "torch", n_ctx=64).engine()
    examples = _batch()
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples,
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, steps=3,
                                   grad_checkpointing=qtype == "F32", compute_dtype="fp32"),
                      tmp_path / "run")
    assert len(trainer.keys) == 7 * 2
    peft = _peft(family, path)
    _, leaves = _same_start(trainer, peft, eng.backend)
    for step in range(3):
        _compare_step(trainer, peft, leaves, step)


def _peft(family, path, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_reference(family, path), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def _graph_order(trainer, leaves):
    """Each leaf's value (PEFT's, Hugging Face row order) in the row order the trainer holds
    it: B of MLA's q / kv_a pairs follows the RoPE rows deinterleaved at load."""
    orders = (graph_rows(trainer.cfg, m) if j else None for _, m in trainer.keys for j in (0, 1))
    return [v if o is None else v[o] for v, o in zip(leaves, orders)]


def _same_start(trainer, peft, backend):
    """Both sides' pairs set to the same random values: (PEFT's LoRA modules, their A and B
    parameters), in the trainer's order."""
    from peft.tuners.lora import LoraLayer

    named = dict(peft.named_modules())
    names = [peft_module_name(trainer.cfg, layer, name) for layer, name in trainer.keys]
    assert {n for n, m in named.items() if isinstance(m, LoraLayer)} == set(names)
    modules, leaves = [], []
    rng = np.random.default_rng(11)
    for k, name in enumerate(names):
        lora = named[name]
        modules.append(lora)
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        for j, param in enumerate((a, b)):
            value = rng.standard_normal(tuple(param.shape)).astype(np.float32) * 0.2
            with torch.no_grad():
                param.copy_(torch.from_numpy(value))
            leaves.append(param)
    trainer.params = [backend.tensor(v) for v in _graph_order(
        trainer, [p.detach().numpy() for p in leaves])]
    return modules, leaves


def _compare_step(trainer, peft, leaves, step):
    """Update `step`'s loss and gradients on both sides (its batch in the trainer's order),
    then the same SGD step on both, so that each step compares at the same point."""
    backend, n = trainer.be, trainer.options.batch_size
    loss, grads, _ = trainer.gradients(step)
    for p in leaves:
        p.grad = None
    want = _peft_loss(peft, [trainer._example(step * n + j) for j in range(n)])
    want.backward()
    assert abs(loss - float(want)) <= 1e-4 * abs(float(want))
    for g, w in zip(grads, _graph_order(trainer, [p.grad.numpy() for p in leaves])):
        assert _rel(backend.to_numpy(g), w) <= 1e-4
    with torch.no_grad():
        for p in leaves:
            p -= LR * p.grad
    trainer.params = [backend.tensor(v) for v in _graph_order(
        trainer, [p.detach().numpy() for p in leaves])]


def _bf16_products(peft):
    """PEFT's model with every base linear and the head multiplying as compute_dtype "bf16"
    does: bf16 copies of x (or grad y) and of the weight, each product rounded to bf16,
    biases added in fp32; the LoRA pairs stay fp32."""
    from peft.tuners.lora import LoraLayer

    def forward(self, x):
        y = (x.to(torch.bfloat16) @ self.weight.to(torch.bfloat16).T).to(torch.float32)
        return y if self.bias is None else y + self.bias

    layers = [m.base_layer for m in peft.modules() if isinstance(m, LoraLayer)]
    for layer in layers + [peft.get_output_embeddings()]:
        layer.forward = types.MethodType(forward, layer)


def _norm_rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("family, qtype", CASES[1:])
def test_bf16_products_equal_peft_with_bf16_products(tmp_path, family, qtype):
    """compute_dtype "bf16" (the default where the CPU has AMX or AVX-512 BF16; torch
    emulates it elsewhere), on sequences long enough (M > 256 rows) that the forward pass
    and the head take the tile path too, against PEFT with bf16 base products.

    These random models' LoRA gradients are sums of large terms that cancel, so a
    product's rounding to bf16 (2^-9 relative) moves them by up to 60 % from fp32 PEFT's;
    the bf16 reference accounts for all but ~3 % of that (two implementations round a few
    elements differently: measured up to 2.9e-2 norm-relative), and the loss agrees to
    ~1e-4. The bounds leave twice that, and demand that ours is at least twice as close to
    the bf16 reference as to the fp32 one."""
    hf = tiny_hf_model(family, seed=1, **DIMS, **FAMILY_DIMS[family])
    path = write_gguf(hf, family, tmp_path / "m.gguf", qtype)
    eng = LoadPlan.open(path, "torch", n_ctx=256).engine()
    rng = np.random.default_rng(3)
    examples = [Example(tuple(int(i) for i in rng.integers(3, 128, n)),
                        (False,) * prompt + (True,) * (n - prompt))
                for n, prompt in ((170, 20), (150, 10))]
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples,
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, max_seq_len=256,
                                   compute_dtype="bf16"), tmp_path / "run")
    peft = {}
    for dtype in ("fp32", "bf16"):
        peft[dtype] = _peft(family, path)
        _, leaves = _same_start(trainer, peft[dtype], eng.backend)
        if dtype == "bf16":
            _bf16_products(peft[dtype])
        want = _peft_loss(peft[dtype], [trainer._example(j) for j in range(2)])
        want.backward()
        peft[dtype] = (float(want), _graph_order(trainer, [p.grad.numpy() for p in leaves]))
    loss, grads, _ = trainer.gradients(0)
    grads = [eng.backend.to_numpy(g) for g in grads]
    want_loss, want_grads = peft["bf16"]
    assert abs(loss - want_loss) <= 1e-3 * abs(want_loss)
    to_bf16 = max(_norm_rel(g, w) for g, w in zip(grads, want_grads))
    to_fp32 = max(_norm_rel(g, w) for g, w in zip(grads, peft["fp32"][1]))
    assert to_bf16 <= 6e-2
    assert to_bf16 * 2 <= to_fp32


class _Mask(torch.nn.Module):
    """PEFT's lora_dropout with a given mask instead of a fresh draw."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape) / (1 - self.p)


def test_dropout_on_the_lora_input_equals_peft_with_the_same_masks(tmp_path, monkeypatch):
    """Dropout 0.3, the llama layers recomputed: each pair's mask (recorded as our backend
    draws it) put into PEFT's lora_dropout gives PEFT's loss and gradients, each update
    draws new masks, a recomputed layer the same ones, and evaluation none."""
    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)
    p = 0.3
    hf = tiny_hf_model("llama", seed=1, **DIMS)
    path = write_gguf(hf, "llama", tmp_path / "m.gguf")
    eng = LoadPlan.open(path, "torch", n_ctx=64).engine()
    drawn, draw = {}, eng.backend.dropout

    def recorded(x, rate, seed):
        out = draw(x, rate, seed)
        drawn.setdefault(seed, []).append(out != 0)
        return out

    monkeypatch.setattr(eng.backend, "dropout", recorded)
    examples = _batch()
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples,
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, steps=2, dropout=p,
                                   grad_checkpointing=True, seed=5, compute_dtype="fp32"),
                      tmp_path / "run")
    peft = _peft("llama", path, p)
    modules, leaves = _same_start(trainer, peft, eng.backend)
    before = None
    for step in range(2):
        drawn.clear()
        seeds = dropout_seeds(5, step, 0, len(trainer.keys))
        # PEFT's forward runs after ours in _compare_step: give it our masks as they come
        real_gradients = trainer.gradients

        def gradients(update, seeds=seeds):
            out = real_gradients(update)
            for lora, seed in zip(modules, seeds):
                # drawn again by the recompute (a backward pass may draw it once more for
                # the input's gradient, zero at the positions no loss reads: not compared)
                assert len(drawn[seed]) >= 2 and torch.equal(*drawn[seed][:2])
                lora.lora_dropout["default"] = _Mask(drawn[seed][0], p)
            return out

        trainer.gradients = gradients
        _compare_step(trainer, peft, leaves, step)
        del trainer.gradients
        keep = torch.cat([drawn[s][0].reshape(-1) for s in seeds]).float()
        assert abs(float(keep.mean()) - (1 - p)) < 0.01   # of ~1e5 draws
        first = drawn[seeds[0]][0]
        assert not torch.equal(first, drawn[seeds[1]][0])
        assert before is None or not torch.equal(first, before)
        before = first
    drawn.clear()
    trainer.evaluate(examples)
    assert drawn == {}
