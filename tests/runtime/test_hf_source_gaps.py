"""What real Hugging Face repositories hold beyond the plain case: named chat templates,
SentencePiece vocabularies shipped only as tokenizer.json, Gemma 3's multimodal config,
MoE experts saved fused. Each against its oracle (gguf-py's writer, the tokenizers
library, transformers)."""

import json

import gguf
import pytest
import numpy as np

from diptych.quant.gguf_file import GGUFFile
from diptych.text.hf_vocab import vocab_metadata

from ..tiny_models import tiny_tokenizer


def test_chat_templates_stored_as_a_list_are_written_as_gguf_py_writes_them(tmp_path):
    folder = tmp_path / "m"
    tiny_tokenizer(folder, "bpe", 320)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    templates = [{"name": "default", "template": config["chat_template"]},
                 {"name": "tool_use", "template": "{{ tools }}"},
                 {"name": "rag-v2", "template": "{{ documents }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": templates}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 320}))
    ours = {k: v for k, v in vocab_metadata(folder, 320, True).items() if "chat_template" in k}

    w = gguf.GGUFWriter(tmp_path / "ref.gguf", "qwen2")
    w.add_chat_template(templates)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ref = GGUFFile(tmp_path / "ref.gguf").metadata
    want = {k: ref[k] for k in ref if "chat_template" in k}
    assert sorted(want.pop("tokenizer.chat_templates")) == sorted(
        ours.pop("tokenizer.chat_templates")) == ["rag_v2", "tool_use"]
    assert ours == want and ours["tokenizer.chat_template"] == config["chat_template"]


def spm_style_tokenizer_json(folder, vocab_size=160):
    """A tokenizer.json as Llama 2's: BPE over '▁'-marked words with byte fallback, a
    Prepend/Replace normalizer, no pre-tokenizer (trained on the test corpus, words split
    while training), and no tokenizer.model beside it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers

    from ..tiny_models import _CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    lines = [line for line in _CORPUS.read_text(encoding="utf-8").splitlines() if line.isascii()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                    AddedToken("<|im_end|>", special=True, normalized=False)])
    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    for b in range(256):   # the byte tokens, for characters the pieces do not cover
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in tj["added_tokens"]:
        t["id"] += 256 if t["content"].startswith("<|") else 0
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": tok.get_vocab_size(), "bos_token_id": 1,
         "eos_token_id": 2}))
    return tok


def test_a_sentencepiece_vocabulary_shipped_only_as_tokenizer_json(tmp_path):
    from diptych.text.tokenizer import Tokenizer

    ref = spm_style_tokenizer_json(tmp_path / "m")
    n = ref.get_vocab_size()
    md = vocab_metadata(tmp_path / "m", n, True)
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"]
    ours = Tokenizer.from_gguf_metadata(md)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)
    for text in ("Hello world, the cat sat.", "  two  spaces\nand a newline 123 4567 é",
                 "the theory of the thing", "<|im_start|>user\nhi there<|im_end|>"):
        want = ref.encode(text).ids
        assert ours.encode(text, add_bos=False) == want, text
        if "<|" not in text:
            assert ours.decode(want) == ref.decode(want)


def test_gemma3_multimodal_folder_loads_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration's folder: text_config (real ones leave most fields to
    the config class's defaults) and language_model.* tensors beside the vision tower's;
    the text model's logits match transformers' on a text-only prompt."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    import diptych

    from ..tiny_models import logits

    torch.manual_seed(4)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                query_pre_attn_scalar=16, initializer_range=0.2, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    folder = tmp_path / "m"
    hf.save_pretrained(folder)
    tiny_tokenizer(folder, "spm", 300)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3" and "vision_config" in config
    ids = list(np.random.default_rng(3).integers(3, 290, 20))
    ours = diptych.load(folder, backend="torch", device="cpu", n_ctx=64)
    assert ours.config.arch == "gemma3" and ours.config.n_layers == 2
    ref = logits(hf, ids)
    assert np.abs(ours.logits(ids) - ref).max() / np.abs(ref).max() <= 1e-4


def test_gemma3_text_config_defaults_are_transformers():
    from transformers import Gemma3TextConfig

    from diptych.model.families.hf import text_model

    config, rename = text_model({"model_type": "gemma3", "tie_word_embeddings": True,
                                 "text_config": {"hidden_size": 2560, "num_hidden_layers": 34}})
    ref = Gemma3TextConfig().to_dict()
    rope = ref["rope_parameters"]
    ref.update(rope_theta=rope["full_attention"]["rope_theta"],
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    defaults = {k: v for k, v in config.items() if k not in (
        "hidden_size", "num_hidden_layers", "model_type", "tie_word_embeddings")}
    assert defaults == {k: ref[k] for k in defaults}
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert rename("language_model.model.layers.3.mlp.up_proj.weight") == \
        "model.layers.3.mlp.up_proj.weight"
    assert rename("model.language_model.norm.weight") == "model.norm.weight"
    assert rename("vision_tower.head.probe") is None
    assert rename("multi_modal_projector.mm_soft_emb_norm.weight") is None


@pytest.mark.parametrize("family, transposed", [("qwen3moe", False), ("mixtral", True)])
def test_experts_saved_fused(tmp_path, family, transposed):
    """A folder holding the model as transformers 5 holds it in memory: each layer's experts
    as one gate_up_proj (n_expert, 2 * ff, d) and one down_proj (n_expert, d, ff) tensor (or
    both transposed, as some repositories store them)."""
    import torch
    from safetensors.torch import save_file

    import diptych

    from ..tiny_models import logits, save_hf_folder, tiny_hf_model

    hf = tiny_hf_model(family, seed=6)
    folder = save_hf_folder(hf, tmp_path / family)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    if transposed:
        state = {k: v.transpose(1, 2).contiguous() if ".experts." in k else v
                 for k, v in state.items()}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(state, folder / "model.safetensors")
    ids = list(np.random.default_rng(5).integers(3, 128, 16))
    ref = logits(hf, ids)
    with torch.no_grad():
        ours = diptych.load(folder, backend="torch", device="cpu", n_ctx=64).logits(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
