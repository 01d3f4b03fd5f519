"""Hugging Face safetensors folders loaded by diptych, against transformers on the same folder."""

import json
import struct

import numpy as np
import pytest
import torch

import diptych
from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.sources.hf_folder import HFSource

from ..tiny_models import FAMILIES, logits, save_hf_folder, tiny_hf_model, tiny_tokenizer

IDS = list(np.random.default_rng(7).integers(3, 128, 24))


def _max_rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_logits_match_transformers(tmp_path, family):
    hf = tiny_hf_model(family, seed=1)
    folder = save_hf_folder(hf, tmp_path / family)
    model = diptych.load(folder, backend="torch", n_ctx=64)
    assert _max_rel(model.logits(IDS), logits(hf, IDS)) <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_folders(tmp_path, dtype):
    """bf16/f16 safetensors: matrices stay in their type (memory-mapped), vectors become F32,
    and the logits match transformers running the same rounded weights in fp32."""
    from transformers import AutoModelForCausalLM

    folder = save_hf_folder(tiny_hf_model("qwen2", seed=2), tmp_path / "m", dtype=dtype)
    src = HFSource(folder)
    want = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    assert src.tensors["blk.0.attn_q.weight"].type_name == want
    assert src.tensors["blk.0.attn_q.bias"].type_name == "F32"
    assert src.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    assert not src.tensors["blk.0.ffn_up.weight"].data.flags.owndata  # a view of the file
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = diptych.load(folder, backend="torch", n_ctx=64)
    assert _max_rel(model.logits(IDS), logits(hf, IDS)) <= 1e-4


@pytest.mark.parametrize("kind,vocab", [("spm", 128), ("bpe", 320)])
def test_tokenizer_matches_the_folders_own(tmp_path, kind, vocab):
    folder = tmp_path / kind
    tiny_tokenizer(folder, kind, vocab)
    bos, eos = (1, 2) if kind == "spm" else (0, 2)  # config.json names them, as real ones do
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos}))
    from diptych.text.hf_vocab import vocab_metadata
    from diptych.text.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf_metadata(vocab_metadata(folder, vocab, True))
    texts = ["Hello world, the cat sat.", "  two  spaces\nand a newline 123 4567",
             "<|im_start|>user\nhi<|im_end|>"]
    if kind == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        assert ours.pre is None or ours.pre == "default"
        assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)
        for text in (texts[0], "  two  spaces and digits 123 4567"):
            assert ours.encode(text, add_bos=False) == sp.encode(text)
    else:
        from tokenizers import Tokenizer as HFTokenizer

        ref = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        assert ours.pre == "qwen2"
        assert (ours.bos_id, ours.eos_id, ours.add_bos) == (0, 2, False)
        for text in texts:
            assert ours.encode(text, add_bos=False) == ref.encode(text).ids
    assert "<|im_start|>" in ours.chat_template


def _folder(tmp_path):
    return save_hf_folder(tiny_hf_model("llama", seed=3), tmp_path / "m")


def test_folder_without_config_json(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json"):
        diptych.load(folder)
    with pytest.raises(ModelFileError, match="config.json"):
        HFSource(folder)


def test_unknown_model_type(tmp_path):
    folder = _folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        diptych.load(folder)


def _rewrite_safetensors(path, drop: str):
    """The file without tensor `drop` (header and data rewritten)."""
    from diptych.sources.hf_folder import read_safetensors

    tensors = {n: a for n, (a, _) in read_safetensors(path).items() if n != drop}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_missing_tensor(tmp_path):
    folder = _folder(tmp_path)
    _rewrite_safetensors(folder / "model.safetensors", "model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(ModelFileError, match=r"layer 1 lacks tensors \['attn_k.weight'\]"):
        HFSource(folder)


def test_truncated_safetensors(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        diptych.load(folder)
    path.write_bytes(data[:5])
    with pytest.raises(ModelFileError, match="truncated or not a safetensors"):
        HFSource(folder)


def test_no_weights_and_unsupported_dtype(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "model.safetensors"
    head = json.dumps({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(8))
    with pytest.raises(UnsupportedModelError, match="I64"):
        HFSource(folder)
    path.unlink()
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        HFSource(folder)


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    """Llama 3.1-style RoPE scaling is written as llama.cpp writes it, a `rope_freqs` tensor
    of per-frequency divisors: base frequencies / divisors = transformers' inv_freq."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = tiny_hf_model("llama", rope_parameters=rope, max_position_embeddings=512)
    src = HFSource(save_hf_folder(hf, tmp_path / "m"))
    divisors = src.tensors["rope_freqs.weight"].dequantize()
    base = 1 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    inv_freq = hf.model.rotary_emb.inv_freq.numpy()
    assert np.allclose(base / divisors, inv_freq, rtol=1e-6)
    assert 1.0 < divisors[1] < 8.0 and divisors[0] == 1.0 and divisors[-1] == 8.0


def test_sharded_folder_with_index(tmp_path):
    """Shards listed by model.safetensors.index.json; a missing shard is named."""
    hf = tiny_hf_model("qwen2", seed=9)
    hf.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    tiny_tokenizer(tmp_path / "m", "spm")
    folder = tmp_path / "m"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    model = diptych.load(folder, backend="torch", n_ctx=64)
    assert _max_rel(model.logits(IDS), logits(hf, IDS)) <= 1e-4
    shards[-1].unlink()
    with pytest.raises(ModelFileError, match="missing weight shards"):
        HFSource(folder)


@pytest.mark.parametrize("header", [[1, 2], {"x": {"dtype": "F32"}},
                                    {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}])
def test_corrupt_safetensors_header(tmp_path, header):
    folder = _folder(tmp_path)
    head = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(8))
    with pytest.raises(ModelFileError, match="not a safetensors file|corrupt header"):
        HFSource(folder)


def test_unsupported_tokenizers(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path / "t"
    folder.mkdir()
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    from diptych.text.hf_vocab import vocab_metadata

    with pytest.raises(UnsupportedModelError, match="none of those diptych runs"):
        vocab_metadata(folder, 2, True)
    tok.decoder = decoders.ByteFallback()  # a SentencePiece-style tokenizer.json
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(UnsupportedModelError, match="byte-level BPE"):
        vocab_metadata(folder, 2, True)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="no tokenizer"):
        vocab_metadata(folder, 2, True)
