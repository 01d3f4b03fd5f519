"""What real Hugging Face repositories hold beyond the plain case: named chat templates,
SentencePiece vocabularies shipped only as tokenizer.json, Gemma 3's multimodal config,
MoE experts saved fused. Each against its oracle (gguf-py's writer, the tokenizers
library, transformers)."""

import json

import gguf
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
