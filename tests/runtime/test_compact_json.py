"""JSON output is compact by default (as OpenAI's structured outputs are): a random tiny
model, which llguidance's flexible whitespace lets pad a value with whitespace until
max_tokens, completes schema-constrained values with no whitespace between tokens; a
schema's own "x-guidance" still chooses another layout."""

import json
import tempfile
from pathlib import Path

import jsonschema
import pytest

import diptych

from ..tiny_models import save_hf_folder, tiny_hf_model

pytest.importorskip("llguidance")
from diptych.inference.constraint import JsonConstraint  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                         "b": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny():
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_folder(tiny_hf_model("qwen2", seed=3, vocab_size=320), Path(tmp) / "m",
                                tokenizer="bpe")
        yield diptych.load(str(folder), n_ctx=96)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_weak_model_completes_compact_json(tiny, seed):
    pieces = list(tiny.stream("{", 64, json_schema=SCHEMA, temperature=1.0, seed=seed))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert text == json.dumps(value, separators=(",", ":"))


def test_the_schemas_own_layout_wins(tiny):
    def admits(schema, text):
        grammar = JsonConstraint(tiny.tokenizer, tiny.config.vocab_size, schema)
        for token in tiny.tokenizer.encode(text, add_bos=False):
            if not grammar.allowed()[token]:
                return False
            grammar.advance(token)
        return grammar.matcher.is_accepting()

    spaced = '{"a": 1, "b": ["x"]}'
    assert not admits(SCHEMA, spaced) and admits(SCHEMA, '{"a":1,"b":["x"]}')
    assert admits(dict(SCHEMA, **{"x-guidance": {"whitespace_flexible": True}}), spaced)
    assert admits(dict(SCHEMA, **{"x-guidance": {"item_separator": ", ",
                                                 "key_separator": ": "}}), spaced)
