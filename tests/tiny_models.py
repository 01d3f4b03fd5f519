"""Tiny random Hugging Face models, one builder per family, and their folders and GGUF files.

    tiny_hf_model(family, seed=0, tied=False, **config)  -> transformers model, fp32, eval mode
    save_hf_folder(model, folder, tokenizer="spm"|"bpe", dtype=None) -> folder (config.json,
        model.safetensors, a tiny tokenizer); dtype="float16"/"bfloat16" stores the weights
        rounded to that type, and the model keeps the rounded weights, back in fp32
    write_gguf(model, family, path, type="F32")  -> path, written by diptych's converter from
        a folder saved beside it (path.with_suffix(".hf")); `family` is implied by the model
    tiny_tokenizer(folder, kind, vocab_size)     -> writes tokenizer files only
    logits(model, ids)                           -> transformers' logits, float32 (len(ids), vocab)

Families: llama, qwen2, mistral, gemma3, qwen3, qwen3moe, mixtral, deepseek_v2, deepseek_v3.
Models are 2 layers, d=64, vocab 128 (a byte-level BPE tokenizer needs vocab_size >= 300),
initializer_range 0.2 and random norm weights and biases, so a wrong norm or bias path shows
in the logits. `**config` overrides any config field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "qwen3", "qwen3moe", "mixtral",
            "deepseek_v2", "deepseek_v3")

_CORPUS = Path(__file__).parent / "fixtures" / "eval_corpus.txt"

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
               rms_norm_eps=1e-5, max_position_embeddings=256)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=32, first_k_dense_replace=1, rope_parameters=_ROPE)

# family -> (transformers config class, model class, family-specific config fields)
_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=_ROPE)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters=_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(sliding_window=8, head_dim=16, rope_parameters=_ROPE)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, rope_parameters=_ROPE)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rope_parameters=_ROPE)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, rope_parameters=_ROPE)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _MLA, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _MLA, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc")),
}


def tiny_hf_model(family: str, seed: int = 0, tied: bool = False, **config):
    import transformers

    config_cls, model_cls, fields = _SPECS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**_COMMON, **fields, "tie_word_embeddings": tied,
                                               **config})
    model = getattr(transformers, model_cls)(cfg).float()
    with torch.no_grad():  # random norms, biases and router biases so a wrong path shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def perturbed_copy(model, scale: float, seed: int = 5):
    """A copy of `model` with seeded noise of `scale` times each tensor's spread added to
    every weight: a draft that agrees with its target often, but not always."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return out


def tiny_tokenizer(folder: Path, kind: str = "spm", vocab_size: int = 128) -> None:
    """A tokenizer trained on the test corpus: SentencePiece (`tokenizer.model`, BOS <s>, EOS
    </s>) or byte-level BPE (`tokenizer.json` with the qwen2 pre-tokenizer, BOS/EOS
    <|endoftext|>), each with a tokenizer_config.json and a ChatML chat template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for line in _CORPUS.read_text(encoding="utf-8").splitlines() if line.isascii()]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    if kind == "spm":
        import io

        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's
            user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
            num_threads=1, hard_vocab_limit=False)
        (folder / "tokenizer.model").write_bytes(buf.getvalue())
        special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    elif kind == "bpe":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(folder / "tokenizer.json"))
        special = dict(bos_token="<|endoftext|>", eos_token="<|im_end|>", add_bos_token=False)
    else:
        raise ValueError(kind)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "chat_template": template}, indent=1))


_SPECIAL_IDS = {"spm": (1, 2), "bpe": (0, 2)}  # (bos, eos) of the tiny tokenizers


def save_hf_folder(model, folder: Path, tokenizer: str = "spm", dtype: str | None = None) -> Path:
    folder = Path(folder)
    # config.json's special ids are what gguf-py reads when there is no tokenizer.json
    bos, eos = _SPECIAL_IDS[tokenizer]
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos, eos, None
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    if dtype is not None:
        model.float()
    tiny_tokenizer(folder, tokenizer, model.config.vocab_size)
    return folder


def write_gguf(model, family: str, path: Path, type: str = "F32") -> Path:
    """`model` converted to GGUF by diptych's converter, through a folder beside `path`."""
    from diptych.sources.convert import convert

    path = Path(path)
    folder = save_hf_folder(model, path.with_suffix(".hf"))
    convert(folder, path, type)
    return path


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()
