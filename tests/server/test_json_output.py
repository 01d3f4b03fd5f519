"""Constrained decoding: JSON mode and JSON schemas, through the Python API and the server;
the output always parses and validates (jsonschema), with speculative decoding too."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from diptych.errors import InvalidArgumentError
from diptych.inference.constraint import JsonConstraint
from diptych.inference.speculative import DEFAULT_DRAFT_MAX, Costs

from .conftest import InWorker, Raw

pytestmark = pytest.mark.real

MODEL = "SmolLM2-135M-Instruct.Q4_1"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                  "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.mark.parametrize("seed", [1])
def test_model_stream_follows_the_schema_when_sampling(smol_model, seed):
    text = smol_model.chat(ASK, max_tokens=60, json_schema=PERSON, temperature=1.0, seed=seed)
    jsonschema.validate(json.loads(text), PERSON)


NEAR_TIE = 1e-3   # fp32 activations: a wide verify step rounds differently


@pytest.fixture(scope="module")
def smol_drafted(smollm2_path):
    """SmolLM2 drafting for itself (a second copy: every draft the same model's guess)."""
    import diptych

    model = diptych.load(smollm2_path, n_ctx=512, draft=smollm2_path)
    # draft whatever the measured costs say (a lookup draft costs nothing)
    model._spec_costs[("draft", DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    model._spec_costs[("lookup", DEFAULT_DRAFT_MAX)] = Costs(0.0, 0.0)
    return InWorker(model)


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_speculative_json_schema_equals_plain_greedy(smol_drafted, mode):
    """Greedy, up to the first near-tie among the tokens the grammar allows there."""
    m = smol_drafted
    prompt = m.chat_prompt([{"role": "user", "content": "Describe a person as JSON, like "
                             '{"name": "Ann", "age": 30, "pets": ["cat"]}.'}])

    def run(speculative):
        pieces = m.stream(prompt, 60, json_schema=PERSON, temperature=0, speculative=speculative)
        return [t for p in pieces for t in p.token_ids], pieces[-1]

    plain, last = run(None)
    spec, spec_last = run(mode)
    assert last.finish_reason == "stop"
    jsonschema.validate(json.loads(m.detokenize(plain[:-1])), PERSON)
    assert spec_last.timings.accepted > 0
    for i, (a, b) in enumerate(zip(spec, plain)):
        if a != b:
            grammar = JsonConstraint(m.tokenizer, m.config.vocab_size, PERSON)
            for t in plain[:i]:
                grammar.advance(t)
            row = m.logits(prompt + plain[:i])[-1][grammar.allowed()]
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (i, a, b)
            return
    assert spec == plain


def test_model_stream_refuses_a_broken_schema(smol_model):
    with pytest.raises(InvalidArgumentError, match="nonsense"):
        smol_model.generate("x", json_schema={"type": "nonsense"})


def test_server_json_schema_equals_the_python_api(smol_server, smol_model):
    raw = Raw(smol_server.base)
    want = smol_model.chat(ASK, max_tokens=60, json_schema=PERSON, temperature=0)
    body = {"model": MODEL, "messages": ASK, "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": PERSON}}}
    reply = raw.post("/chat/completions", body)
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(want), PERSON)

    chunks = raw.events("/chat/completions", dict(body, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want


def test_server_json_object_mode_gives_an_object(smol_server):
    reply = Raw(smol_server.base).post("/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "A JSON object, please."}],
        "max_tokens": 80, "temperature": 0, "response_format": {"type": "json_object"}})
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)


def test_server_refuses_a_broken_schema(smol_server):
    status, reply = Raw(smol_server.base).call("POST", "/chat/completions", {
        "model": MODEL, "messages": ASK, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert status == 400 and reply["error"]["param"] == "response_format"
