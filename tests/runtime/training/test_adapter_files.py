"""Adapter files: ours loaded by PEFT, PEFT's loaded by diptych, the GGUF LoRA form (llama's
Q/K row order, rsLoRA scaling), hot-swapping on a loaded model, and refusals."""

import numpy as np
import pytest
import torch

import diptych
from diptych.errors import InvalidArgumentError, ModelFileError
from diptych.model.adapter_files import LoraAdapter, read_adapter, write_adapter

from ...tiny_models import tiny_hf_model, write_gguf
from .random_adapter import random_adapter

IDS = [1, 5, 9, 22, 7, 40, 3, 17, 60, 2]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = tiny_hf_model("llama", seed=6)
    path = write_gguf(hf, "llama", tmp_path_factory.mktemp("adapters") / "m.gguf")
    return hf, path, diptych.load(path, backend="torch", n_ctx=64)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _close(got, want):
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_in_peft_and_as_gguf_gives_our_logits(llama, tmp_path, rslora):
    from peft import PeftModel

    hf, _, model = llama
    adapter = random_adapter(model, 1, rslora)
    write_adapter(adapter, model.config, tmp_path)
    model.set_adapter(tmp_path)
    ours = model.logits(IDS)
    want = _logits(PeftModel.from_pretrained(tiny_hf_model("llama", seed=6), tmp_path))
    _close(ours, want)
    assert np.abs(want - _logits(hf)).max() > 1e-2 * np.abs(want).max()  # it changed them
    model.set_adapter(tmp_path / "adapter.gguf")   # Q/K rows permuted in the file, alpha scaled
    _close(model.logits(IDS), want)
    back = read_adapter(tmp_path / "adapter.gguf", model.config)
    for key, (a, b) in adapter.pairs.items():
        assert np.array_equal(back.pairs[key][0], a) and np.array_equal(back.pairs[key][1], b)
    assert back.scale == pytest.approx(adapter.scale)
    model.set_adapter(None)
    _close(model.logits(IDS), _logits(hf))


def test_a_peft_made_adapter_hot_swaps_in(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, path, model = llama
    peft = get_peft_model(tiny_hf_model("llama", seed=6), LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"],
        layers_to_transform=[1]))
    peft.save_pretrained(tmp_path)
    model.generate(IDS, max_tokens=3, temperature=0)
    assert model.engine.n_cached > 0
    model.set_adapter(tmp_path)
    assert model.engine.n_cached == 0      # K/V of the old weights are gone
    _close(model.logits(IDS), _logits(peft))
    model.set_adapter(tmp_path, scale=0.0)
    _close(model.logits(IDS), _logits(hf))
    loaded = diptych.load(path, backend="torch", n_ctx=64, adapter=tmp_path)
    assert loaded.adapter == str(tmp_path)
    _close(loaded.logits(IDS), _logits(peft))
    model.set_adapter(None)


def test_adapters_that_do_not_fit_are_refused(llama, tmp_path):
    hf, path, model = llama
    other = LoraAdapter({(0, "q_proj"): (np.ones((4, 32), np.float32),
                                         np.ones((64, 4), np.float32))}, 8.0, 4)
    write_adapter(other, model.config, tmp_path)
    with pytest.raises(InvalidArgumentError, match="another model"):
        model.set_adapter(tmp_path)
    assert all(not layer.adapters for layer in model.engine.weights.layers)
    with pytest.raises(ModelFileError, match="not a GGUF LoRA adapter"):
        model.set_adapter(path)
    with pytest.raises(ModelFileError, match="no adapter at"):
        model.set_adapter(tmp_path / "missing.gguf")


# Attention only: the dense and shared-expert MLPs are test_moe_adapters.py's.
@pytest.mark.parametrize("family, targets", [
    ("deepseek_v2", ["q_proj", "kv_a_proj_with_mqa", "o_proj"]),
    ("deepseek_v3", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]),
    ("qwen3moe", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_peft_adapters_on_mla_and_moe_attention_give_peft_logits(tmp_path, family, targets):
    """MLA layers' RoPE rows are put into NeoX halves at load, so B's rows of q / q_b and
    kv_a_proj_with_mqa must follow them (they did not: a relative error of 0.95)."""
    from peft import LoraConfig, get_peft_model

    from ...tiny_models import logits

    hf = tiny_hf_model(family, seed=2)
    path = write_gguf(hf, family, tmp_path / "m.gguf")
    model = diptych.load(path, backend="torch", n_ctx=64)
    base_err = np.abs(model.logits(IDS) - logits(hf, IDS)).max()   # MoE routing's rounding
    peft = get_peft_model(tiny_hf_model(family, seed=2), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    peft.save_pretrained(tmp_path / "adapter")
    want = logits(peft, IDS)
    model.set_adapter(tmp_path / "adapter")
    assert np.abs(want - logits(hf, IDS)).max() > 0.3 * np.abs(want).max()   # it matters
    assert np.abs(model.logits(IDS) - want).max() <= 2 * base_err + 1e-4 * np.abs(want).max()


def test_a_trained_mla_adapter_is_written_in_hugging_face_row_order(tmp_path):
    """What the trainer holds (B in the loaded base's row order) is written back in Hugging
    Face order: loaded from the files, it gives the logits training saw."""
    from diptych.load_plan import LoadPlan
    from diptych.model.graph import forward_all
    from diptych.training.data import Example
    from diptych.training.lora import attach
    from diptych.training.loop import Trainer
    from diptych.training.options import TrainOptions

    path = write_gguf(tiny_hf_model("deepseek_v2", seed=2), "deepseek_v2", tmp_path / "m.gguf")
    eng = LoadPlan.open(path, "torch", n_ctx=64).engine()
    options = TrainOptions(rank=4, modules=("q_proj", "kv_a_proj_with_mqa"), steps=1)
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, [Example(tuple(IDS), (True,) * 10)],
                      options, tmp_path / "run")
    rng = np.random.default_rng(3)
    trainer.params = [eng.backend.tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3)
                      for p in trainer.params]
    attach(eng.cfg, eng.weights, trainer.keys, trainer.params, options.scale)
    with eng.backend.inference():
        seen = eng.backend.to_numpy(forward_all(eng.backend, eng.cfg, eng.weights,
                                                eng.backend.ids([IDS])))[0]
    trainer.save()
    loaded = diptych.load(path, backend="torch", n_ctx=64, adapter=tmp_path / "run")
    _close(loaded.logits(IDS), seen)
