"""A GGUF LoRA on the real SmolLM2 model, against llama.cpp with the same file (committed
fixtures, made by scripts/make_lora_fixtures.py): diptych's export of the committed PEFT
adapter is the committed adapter.gguf byte for byte, and with it loaded diptych's logits
meet the real-model bar against llama.cpp's."""

import hashlib

import numpy as np
import pytest

import diptych
from diptych.model.adapter_files import read_peft, write_gguf_lora

from ..reference_metrics import FIXTURES, corpus_agreement, load_reference

pytestmark = pytest.mark.real

LORA = FIXTURES / "lora_smollm2"


def _reference() -> dict:
    with np.load(LORA / "reference.npz") as f:
        return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in f.files}


def test_our_export_of_the_peft_adapter_is_the_committed_gguf_byte_for_byte(smollm2, tmp_path):
    digest = (LORA / "adapter.gguf.sha256").read_text().strip()
    assert hashlib.sha256((LORA / "adapter.gguf").read_bytes()).hexdigest() == digest
    write_gguf_lora(read_peft(LORA), smollm2.config, tmp_path / "adapter.gguf")
    assert (tmp_path / "adapter.gguf").read_bytes() == (LORA / "adapter.gguf").read_bytes()


def test_with_the_gguf_lora_our_logits_agree_with_llama_cpp(smollm2_path):
    ref, base = _reference(), load_reference("smollm2")
    assert ref["adapter_sha256"] == (LORA / "adapter.gguf.sha256").read_text().strip()
    # the adapter matters: llama.cpp's top-1 moved at a good share of the positions
    moved = ref["corpus_topk_ids"][:, 0] != base["corpus_topk_ids"][:, 0]
    assert moved.mean() > 0.15   # 0.22
    model = diptych.load(smollm2_path, backend="torch", n_ctx=2048, adapter=LORA / "adapter.gguf")
    agree, kl = corpus_agreement(model, ref, n_segments=3)   # 1412 positions
    assert agree >= 0.99, f"top-1 outside near-ties {agree:.4f}"
    assert kl.mean() <= 0.01, f"mean KL {kl.mean():.4f}"
