"""Training data: the three JSONL forms, chat loss masks against transformers'
`return_assistant_tokens_mask`, and malformed input."""

import json

import pytest

from diptych.errors import DatasetError
from diptych.quant.gguf_file import GGUFFile
from diptych.text.tokenizer import Tokenizer
from diptych.training.data import data_files, example, load_examples

from ...tiny_models import save_hf_folder, tiny_hf_model

# ChatML with {% generation %} around each assistant turn's text and end token
MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
          "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CHATS = [
    [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is it"},
     {"role": "assistant", "content": "a small thing"}, {"role": "user", "content": "and then"},
     {"role": "assistant", "content": "the end of it"}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours, transformers') for one byte-level BPE vocabulary with a ChatML template."""
    from transformers import PreTrainedTokenizerFast

    from diptych.sources.convert import convert

    folder = save_hf_folder(tiny_hf_model("qwen2", vocab_size=300),
                            tmp_path_factory.mktemp("data") / "hf", tokenizer="bpe")
    gguf = convert(folder, folder.with_suffix(".gguf"), "F32")
    ours = Tokenizer.from_gguf_metadata(GGUFFile(gguf).metadata)
    return ours, PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


@pytest.mark.parametrize("chat", CHATS)
def test_chat_masks_equal_transformers_assistant_masks(tokenizers, chat):
    ours, hf = tokenizers
    want = hf.apply_chat_template(chat, chat_template=MARKED, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ours.chat_template = MARKED
    marked = example({"messages": chat}, ours)
    ours.chat_template = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    unmarked = example({"messages": chat}, ours)  # the turns found without markers
    assert list(marked.ids) == want["input_ids"] == list(unmarked.ids)
    assert [int(m) for m in marked.mask] == want["assistant_masks"]
    assert marked.mask == unmarked.mask
    # every assistant turn is learned, each ending with its end token
    end = ours.token_to_id("<|im_end|>")
    n_assistant = sum(m["role"] == "assistant" for m in chat)
    assert sum(i == end and m for i, m in zip(marked.ids, marked.mask)) == n_assistant


def test_text_and_completion_forms(tokenizers):
    tok = tokenizers[0]
    text = example({"text": "the cat sat"}, tok)
    assert list(text.ids) == tok.encode("the cat sat") + [tok.eos_id] and all(text.mask)
    pc = example({"prompt": "the cat", "completion": " sat on"}, tok)
    n = len(tok.encode("the cat"))
    assert list(pc.ids) == tok.encode("the cat") + tok.encode(" sat on", add_bos=False) + [
        tok.eos_id]
    assert pc.mask == (False,) * n + (True,) * (len(pc.ids) - n)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "line 2: not valid JSON"),
    ('["text"]', "line 2: a line must be a JSON object"),
    ('{"prompt": "a"}', "line 2: expected the keys"),
    ('{"text": ""}', "line 2: 'text' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the conversation has no "
                                                          "assistant"),
    ('{"messages": [{"role": "user"}]}', "line 2: messages\\[0\\]"),
])
def test_malformed_lines_name_file_and_line(tokenizers, tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=f"train.jsonl, {message}"):
        load_examples(path, tokenizers[0])


def test_data_directories(tmp_path):
    with pytest.raises(DatasetError, match="no train.jsonl"):
        data_files(tmp_path)
    with pytest.raises(DatasetError, match="no data at"):
        data_files(tmp_path / "missing")
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a"}\n')
    assert data_files(tmp_path) == {"train": tmp_path / "train.jsonl",
                                    "test": tmp_path / "test.jsonl"}
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl", None)
