"""`diptych serve --draft ... --draft-max N` and the request-level speculative options
(speculative, draft_max, lookup_ngram): greedy replies equal plain greedy up to the first
near-tie, constrained replies validate, /health counts the verify passes, bad options are
400s."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from diptych.inference.constraint import JsonConstraint

from .conftest import API_KEY, Raw, ServerProcess

pytestmark = pytest.mark.real

MODEL = "SmolLM2-135M-Instruct.Q4_1"
NEAR_TIE = 1e-3
ASK = [{"role": "user", "content": "Write the numbers from one to ten in words."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "people": {"type": "integer", "minimum": 0}},
          "required": ["city", "people"], "additionalProperties": False}


@pytest.fixture(scope="module")
def drafted(smollm2_path):
    """SmolLM2 drafted for by a second copy of itself, 2 slots, at most 4 drafts a pass."""
    server = ServerProcess(smollm2_path, "--n-ctx", "512", "--parallel", "2", "--api-key",
                           API_KEY, "--draft", str(smollm2_path), "--draft-max", "4")
    yield Raw(server.base)
    server.close()


def _same_up_to_near_tie(model, prompt, got, want, schema=None):
    """got equals want, or they part where want's model has a near-tie (among the tokens the
    grammar allows there)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            row = model.logits(prompt + want[:i])[-1]
            if schema is not None:
                grammar = JsonConstraint(model.tokenizer, model.config.vocab_size, schema)
                for t in want[:i]:
                    grammar.advance(t)
                row = row[grammar.allowed()]
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (i, a, b)
            return
    assert got == want


def _reply_ids(model, reply) -> list[int]:
    return model.tokenize(reply["choices"][0]["message"]["content"], add_bos=False,
                          special=False)


def test_draft_by_default_and_lookup_on_request_equal_plain_greedy(drafted, smol_model):
    prompt = smol_model.chat_prompt(ASK)
    plain = [t for p in smol_model.stream(prompt, 16, temperature=0) for t in p.token_ids]
    want = smol_model.detokenize(plain[:-1] if plain[-1] in smol_model.tokenizer.eog_ids
                                 else plain)
    for extra in ({}, {"speculative": "lookup", "lookup_ngram": 2, "draft_max": 3}):
        before = drafted.health()
        body = {"model": MODEL, "messages": ASK, "max_tokens": 16, "temperature": 0, **extra}
        reply = drafted.post("/chat/completions", body)
        after = drafted.health()
        got = reply["choices"][0]["message"]["content"]
        if got == want:
            assert reply["usage"]["completion_tokens"] == len(plain)
        else:
            _same_up_to_near_tie(smol_model, prompt, _reply_ids(smol_model, reply), plain)
        assert after["verify_passes"] > before["verify_passes"]
    assert drafted.health()["slots_idle"] == 2

    # plain on request: nothing drafted
    before = drafted.health()
    reply = drafted.post("/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 8,
                                               "temperature": 0, "speculative": "none"})
    assert reply["choices"][0]["message"]["content"] == smol_model.detokenize(plain[:8])
    assert drafted.health()["verify_passes"] == before["verify_passes"]


# the draft model under a grammar: tests/server/test_json_output.py, in-process
@pytest.mark.parametrize("mode", ["lookup"])
def test_constrained_reply_with_speculation_validates_and_equals_plain(drafted, smol_model, mode):
    ask = [{"role": "user", "content": "Which city has the most people? Answer as JSON."}]
    prompt = smol_model.chat_prompt(ask)
    plain = [t for p in smol_model.stream(prompt, 40, json_schema=SCHEMA, temperature=0)
             for t in p.token_ids]
    reply = drafted.post("/chat/completions", {
        "model": MODEL, "messages": ask, "max_tokens": 40, "temperature": 0,
        "speculative": mode, "response_format": {
            "type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}})
    text = reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    if text != smol_model.detokenize(plain[:-1]):
        _same_up_to_near_tie(smol_model, prompt, _reply_ids(smol_model, reply), plain, SCHEMA)


@pytest.mark.parametrize("extra,param", [
    ({"speculative": "bogus"}, "speculative"),
    ({"speculative": 1}, "speculative"),
    ({"draft_max": 5}, "draft_max"),              # past the server's --draft-max 4
    ({"draft_max": 0}, "draft_max"),
    ({"lookup_ngram": "3"}, "lookup_ngram"),
    ({"speculative": "none", "draft_max": 2}, "draft_max"),
    ({"speculative": "lookup", "logprobs": True}, "speculative"),
])
def test_bad_speculative_options_are_400s(drafted, extra, param):
    status, reply = drafted.call("POST", "/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 4, **extra})
    assert status == 400 and reply["error"]["param"] == param, reply


def test_logprobs_without_speculative_options_decode_plainly(drafted):
    reply = drafted.post("/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 4,
                                               "logprobs": True, "temperature": 0})
    assert len(reply["choices"][0]["logprobs"]["content"]) == 4


def test_draft_on_a_server_without_a_draft_is_a_400(smol_server):
    status, reply = Raw(smol_server.base).call("POST", "/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 4, "speculative": "draft"})
    assert status == 400 and "--draft" in reply["error"]["message"]


def test_the_servers_lookup_ngram_is_what_requests_get_unless_they_ask(smollm2_path):
    """`serve --lookup --lookup-ngram N`: N for requests without their own lookup_ngram."""
    import diptych
    from diptych.server.app import Server
    from diptych.server.validate import chat_request

    server = Server(diptych.load(smollm2_path, n_ctx=64, draft_max=4), speculative="lookup",
                    lookup_ngram=2)
    body = {"model": MODEL, "messages": ASK}
    plain = server._speculation(chat_request(body, MODEL, 16))
    own = server._speculation(chat_request(dict(body, lookup_ngram=5), MODEL, 16))
    assert (plain.mode, plain.lookup_ngram, own.lookup_ngram) == ("lookup", 2, 5)
