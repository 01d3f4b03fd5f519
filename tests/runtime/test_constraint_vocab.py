"""The grammar engine's view of a SentencePiece vocabulary that puts a space before the text
(add_space_prefix, as Llama and Mistral GGUFs do): the tokens it gets for a string spell that
string exactly, and a schema-constrained generation on such a model completes and validates."""

import json
import tempfile
from pathlib import Path

import jsonschema
import pytest

import diptych

from ..tiny_models import save_hf_folder, tiny_hf_model

llg = pytest.importorskip("llguidance")
from diptych.inference.constraint import _Vocabulary  # noqa: E402

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["a"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}


@pytest.fixture(scope="module")
def spm_model():
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_folder(tiny_hf_model("llama"), Path(tmp) / "m", tokenizer="spm")
        model = diptych.load(str(folder))
        assert model.tokenizer.strips_leading_space
        yield model


@pytest.mark.parametrize("text", ["abc", "{", " {", '{"a": 12}', "  two spaces", "x"])
def test_tokens_spell_the_text_without_the_space_prefix(spm_model, text):
    vocab = _Vocabulary(spm_model.tokenizer, spm_model.config.vocab_size)
    ids = vocab(text)
    assert b"".join(spm_model.tokenizer.token_bytes(i) for i in ids) == text.encode()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schema_generation_completes_on_a_space_prefix_vocabulary(spm_model, seed):
    text = "".join(p.text for p in spm_model.stream("hi", max_tokens=40, json_schema=SCHEMA,
                                                     temperature=1.0, seed=seed))
    jsonschema.validate(json.loads(text), SCHEMA)
