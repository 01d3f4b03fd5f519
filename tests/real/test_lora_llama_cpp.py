"""A GGUF LoRA on the real SmolLM2 model, against llama.cpp with the same file (committed
fixtures, made by scripts/make_lora_fixtures.py): diptych's export of the committed PEFT
adapter is the committed adapter.gguf byte for byte, and with it loaded diptych's logits
meet the real-model bar against llama.cpp's; likewise with the GGUF LoRA llama.cpp's
convert_lora_to_gguf.py made from the same PEFT adapter, and on the file `diptych.fuse`
writes from the model and that adapter."""

import hashlib

import numpy as np
import pytest

import diptych
from diptych.model.adapter_files import read_gguf_lora, read_peft, write_gguf_lora

from ..reference_metrics import FIXTURES, corpus_agreement, load_reference

pytestmark = pytest.mark.real

LORA = FIXTURES / "lora_smollm2"


def _reference(name: str) -> dict:
    with np.load(LORA / name) as f:
        return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in f.files}


def _agrees(path, lora, ref, n_segments):
    model = diptych.load(path, backend="torch", n_ctx=2048, adapter=lora)
    agree, kl = corpus_agreement(model, ref, n_segments)
    assert agree >= 0.99, f"top-1 outside near-ties {agree:.4f}"
    assert kl.mean() <= 0.01, f"mean KL {kl.mean():.4f}"


def test_our_export_of_the_peft_adapter_is_the_committed_gguf_byte_for_byte(smollm2, tmp_path):
    digest = (LORA / "adapter.gguf.sha256").read_text().strip()
    assert hashlib.sha256((LORA / "adapter.gguf").read_bytes()).hexdigest() == digest
    write_gguf_lora(read_peft(LORA), smollm2.config, tmp_path / "adapter.gguf")
    assert (tmp_path / "adapter.gguf").read_bytes() == (LORA / "adapter.gguf").read_bytes()


def test_with_the_gguf_lora_our_logits_agree_with_llama_cpp(smollm2_path):
    ref, base = _reference("reference.npz"), load_reference("smollm2")
    assert ref["adapter_sha256"] == (LORA / "adapter.gguf.sha256").read_text().strip()
    # the adapter matters: llama.cpp's top-1 moved at a good share of the positions
    moved = ref["corpus_topk_ids"][:, 0] != base["corpus_topk_ids"][:, 0]
    assert moved.mean() > 0.15   # 0.22
    _agrees(smollm2_path, LORA / "adapter.gguf", ref, 2)   # 772 positions


def test_llama_cpp_s_conversion_of_the_peft_adapter_loads_and_agrees(smollm2, smollm2_path):
    converted = read_gguf_lora(LORA / "converted.gguf", smollm2.config)
    peft = read_peft(LORA)
    assert converted.scale == peft.scale and converted.pairs.keys() == peft.pairs.keys()
    for key, (a, b) in peft.pairs.items():   # lora_b of attn_q/attn_k un-permuted on the way in
        assert np.array_equal(converted.pairs[key][0], a)
        assert np.array_equal(converted.pairs[key][1], b)
    # the pairs are the PEFT adapter's exactly: one segment (391 positions) for the file's
    # scaling and names as llama.cpp reads them
    _agrees(smollm2_path, LORA / "converted.gguf", _reference("converted_reference.npz"), 1)


def test_our_fused_file_loads_in_llama_cpp_and_agrees(smollm2_path, tmp_path):
    """`diptych.fuse` writes the file the fixture script gave llama.cpp (same sha256; each
    tensor in its input type, the merged ones requantized to Q4_1), and on it diptych's
    logits meet the bar against llama.cpp's."""
    ref, base = _reference("fused_reference.npz"), load_reference("smollm2")
    fused = tmp_path / "fused.gguf"
    diptych.fuse(smollm2_path, LORA, fused)
    assert hashlib.sha256(fused.read_bytes()).hexdigest() == ref["fused_sha256"]
    moved = ref["corpus_topk_ids"][:, 0] != base["corpus_topk_ids"][:, 0]
    assert moved.mean() > 0.15   # 0.24: the adapter is in the file
    _agrees(fused, None, ref, 1)   # 391 positions
