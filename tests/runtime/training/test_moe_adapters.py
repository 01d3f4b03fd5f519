"""LoRA on the MLPs of MoE models against PEFT: the shared experts of MoE layers and the
dense MLPs of the layers before them (DeepSeek's first_k_dense_replace). Of the MoE families
diptych loads, only deepseek2 (DeepSeek-V2 and V3) has either; qwen3moe and Mixtral have
routed experts alone, which take no adapters.

PEFT 0.21 on transformers 5 rewrites every gate_proj/up_proj/down_proj target of these
models (by name, suffix or regex) into target_parameters on the routed experts' stacked
matrices, for adapters trained on transformers 4 (huggingface/peft#3711), so the dense and
shared-expert linears get no LoRA at all. `peft_modules` turns that rewrite off: PEFT's own
LoRA layers then sit on exactly the nn.Linear modules named, which is the oracle here.
"""

import numpy as np
import pytest

import diptych
from diptych.errors import InvalidArgumentError, UnsupportedModelError
from diptych.load_plan import LoadPlan
from diptych.quant.gguf_file import GGUFFile
from diptych.training import loop
from diptych.training.loop import Trainer
from diptych.training.lora import choose_targets
from diptych.training.options import TrainOptions

from ...tiny_models import logits, tiny_hf_model, write_gguf
from .random_adapter import random_adapter
from .test_peft_oracle import ALPHA, RANK, _batch, _compare_step, _same_start

IDS = [1, 5, 9, 22, 7, 40, 3, 17, 60, 2]
MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = {"deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "o_proj"],
             "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]}


@pytest.fixture
def peft_modules(monkeypatch):
    """PEFT with its transformers 4 -> 5 MoE target rewrite turned off."""
    from peft.utils import transformers_weight_conversion

    monkeypatch.setattr(transformers_weight_conversion, "convert_peft_config_for_transformers",
                        lambda *args, **kwargs: None)


def _lora_modules(peft) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in peft.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (the transformers model, diptych's model of its GGUF, their logits' error),
    each built once."""
    models = {}

    def get(family):
        if family not in models:
            hf = tiny_hf_model(family, seed=2)
            path = write_gguf(hf, family, tmp_path_factory.mktemp(family) / "m.gguf")
            model = diptych.load(path, backend="torch", n_ctx=64)
            # the base's error: MoE routing's rounding and the fp16 KV cache
            models[family] = hf, model, np.abs(model.logits(IDS) - logits(hf, IDS)).max()
        models[family][1].set_adapter(None)
        return models[family]

    return get


def _agrees(got, want, base_err):
    """The attention test's rule: within twice the base model's error, plus fp32 rounding."""
    assert np.abs(got - want).max() <= 2 * base_err + 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_peft_adapters_on_dense_and_shared_expert_mlps_give_peft_logits(
        tmp_path, loaded, peft_modules, family):
    from peft import LoraConfig, get_peft_model

    hf, model, base_err = loaded(family)
    peft = get_peft_model(tiny_hf_model(family, seed=2), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=MLP))
    assert _lora_modules(peft) == {f"base_model.model.model.layers.{name}" for name in (
        *(f"0.mlp.{m}" for m in MLP), *(f"1.mlp.shared_experts.{m}" for m in MLP))}
    peft.save_pretrained(tmp_path / "adapter")
    want = logits(peft, IDS)
    assert np.abs(want - logits(hf, IDS)).max() > 0.3 * np.abs(want).max()   # it matters
    model.set_adapter(tmp_path / "adapter")
    _agrees(model.logits(IDS), want, base_err)


def test_peft_adapters_on_the_routed_experts_are_refused_by_name(tmp_path, loaded):
    """What PEFT makes of gate/up/down_proj on transformers 5 (the routed experts' stacked
    parameters) is refused whole, naming them; nothing is dropped silently."""
    from peft import LoraConfig, get_peft_model

    _, model, _ = loaded("deepseek_v2")
    get_peft_model(tiny_hf_model("deepseek_v2", seed=2), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", *MLP])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UnsupportedModelError, match=r"\['down_proj', 'gate_up_proj'\] "
                                                    r"\(routed experts"):
        model.set_adapter(tmp_path / "adapter")
    assert all(not layer.adapters for layer in model.engine.weights.layers)


def test_mlp_modules_on_routed_experts_alone_are_refused_by_name(loaded):
    _, model, _ = loaded("qwen3moe")
    with pytest.raises(InvalidArgumentError, match="layer 0 of this model has no up_proj: its "
                                                   "MLP is routed experts alone"):
        choose_targets(model.config, model.engine.weights, ("q_proj", "up_proj"), None)
    assert len(choose_targets(model.config, model.engine.weights, None, None)) == 2 * 4


def test_our_adapter_on_attention_and_mlps_loads_in_peft_with_our_logits(tmp_path, loaded,
                                                                          peft_modules):
    """Pairs on every projection diptych targets (dense MLP in layer 0, shared experts in
    layer 1), from a trainer's folder: PEFT gives our logits, and so does adapter.gguf,
    whose tensors are named as gguf-py maps the PEFT modules (ffn_*_shexp in layer 1)."""
    import gguf
    from peft import PeftModel
    from safetensors import safe_open

    hf, model, base_err = loaded("deepseek_v2")
    eng = model.engine
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, _batch(),
                      TrainOptions(rank=4, steps=1), tmp_path / "run")
    assert set(trainer.keys) == {(i, m) for i in (0, 1) for m in ATTENTION["deepseek_v2"] + MLP}
    pairs = random_adapter(model, 1).pairs
    trainer.params = [eng.backend.tensor(x) for key in trainer.keys for x in pairs[key]]
    trainer.save()
    model.set_adapter(tmp_path / "run")
    ours = model.logits(IDS)
    peft = PeftModel.from_pretrained(tiny_hf_model("deepseek_v2", seed=2), tmp_path / "run")
    assert len(_lora_modules(peft)) == len(trainer.keys)
    want = logits(peft, IDS)
    assert np.abs(want - logits(hf, IDS)).max() > 0.3 * np.abs(want).max()   # it matters
    _agrees(ours, want, base_err)
    names, gguf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, 2), set()
    with safe_open(tmp_path / "run" / "adapter_model.safetensors", "np") as f:
        for key in f.keys():   # base_model.model.<module>.lora_A.weight
            module, half = key.removeprefix("base_model.model.").split(".lora_")
            gguf_names.add(f"{names.get_name(module)}.weight.lora_{half[0].lower()}")
    assert set(GGUFFile(tmp_path / "run" / "adapter.gguf").tensors) == gguf_names
    assert {"blk.1.ffn_gate_shexp.weight.lora_a", "blk.0.ffn_down.weight.lora_b"} <= gguf_names
    model.set_adapter(tmp_path / "run" / "adapter.gguf")
    assert np.abs(model.logits(IDS) - ours).max() <= 1e-5 * np.abs(ours).max()


def test_training_on_mla_dense_and_shared_experts_equals_peft_for_three_sgd_steps(
        tmp_path, monkeypatch, peft_modules):
    """test_peft_oracle's protocol on deepseek_v2 (F32, gradient checkpointing): MLA
    attention, a dense MLP layer and an MoE layer's shared experts, every projection."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(loop, "head_piece", lambda vocab, rows: 1)
    hf = tiny_hf_model("deepseek_v2", seed=1)
    eng = LoadPlan.open(write_gguf(hf, "deepseek_v2", tmp_path / "m.gguf"), "torch",
                        n_ctx=64).engine()
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, _batch(),
                      TrainOptions(rank=RANK, alpha=ALPHA, batch_size=2, steps=3,
                                   grad_checkpointing=True), tmp_path / "run")
    peft = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA,
                                         target_modules=ATTENTION["deepseek_v2"] + MLP))
    _, leaves = _same_start(trainer, peft, eng.backend)
    for step in range(3):
        _compare_step(trainer, peft, leaves, step)
