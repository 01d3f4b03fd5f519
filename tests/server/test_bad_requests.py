"""Malformed requests to the real server: each gets a 4xx with an OpenAI-style error body,
and the server keeps serving."""

from __future__ import annotations

import pytest

from .conftest import Raw

pytestmark = pytest.mark.real

MODEL = "SmolLM2-135M-Instruct.Q4_1"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 1}

# wrong values for the fields both endpoints take
COMMON = {
    "model": [5, "gpt-4", ["a"]],
    "max_tokens": ["10", 0, -1, 1.5, True, 10**9, [], {}],
    "temperature": ["hot", -0.1, 2.5, True, []],
    "top_p": [0, 1.5, -1, "x"],
    "top_k": [-1, 1.5, "x"],
    "min_p": [1, -0.1, "x"],
    "repetition_penalty": [0, -1, 11, "x"],
    "presence_penalty": [3, -3, "x"],
    "frequency_penalty": [3, -2.5, "x"],
    "seed": [-1, "x", 1.5, 2**64],
    "stop": [5, [1, 2], ["a"] * 17, {"a": 1}],
    "n": [2, 0, "1"],
    "stream": ["yes", 1],
    "stream_options": [{"include_usage": True}],      # without stream
    "logit_bias": [{"abc": 1}, {"1": 500}, [1], {"-1": 1}, {"1": "x"}],
    "no_such_field": [1],
}
CHAT_ONLY = {
    "messages": [None, [], "hi", [5], [{"role": "wizard", "content": "x"}],
                 [{"role": "user"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                 [{"role": "tool", "content": "x"}],
                 [{"role": "user", "content": "x", "tool_calls": []}],
                 [{"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                    "arguments": "{bad"}}]}]],
    "logprobs": ["yes", 1],
    "top_logprobs": [3, 21, "x"],
    "max_completion_tokens": [0, "x"],
    "response_format": [{"type": "xml"}, "json", {}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"schema": {}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
                        {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"minimum": "x"}}}],
    "tools": ["x", [{"type": "function"}], [{"type": "retrieval"}], [5]],
    "tool_choice": ["sometimes", 5, "required"],     # without tools
}
TEXT_ONLY = {
    "prompt": [None, "", [], ["a", "b"], [1.5], [-1], [10**9], {"a": 1}, [[]]],
    "logprobs": [6, -1, "x"],
    "echo": [True, "x"],
    "best_of": [2, "x"],
    "suffix": ["x"],
}


def cases():
    for path, base, table in (("/chat/completions", CHAT, {**COMMON, **CHAT_ONLY}),
                              ("/completions", TEXT, {**COMMON, **TEXT_ONLY})):
        for name, values in table.items():
            for value in values:
                yield path, dict(base, **{name: value})


@pytest.fixture(scope="module")
def raw(smol_server):
    return Raw(smol_server.base)


def check_error(status: int, body, low: int = 400, high: int = 499) -> None:
    assert low <= status <= high, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and {"param", "code"} <= set(error)


def test_wrong_fields_are_400s_and_the_server_keeps_serving(raw):
    all_cases = list(cases())
    assert len(all_cases) > 100
    for path, body in all_cases:
        status, reply = raw.call("POST", path, body)
        check_error(status, reply)
        if body.get("model") == "gpt-4":
            assert status == 404 and reply["error"]["code"] == "model_not_found"
        else:
            assert status == 400, (path, body, reply)
    assert raw.post("/chat/completions", CHAT)["choices"][0]["finish_reason"] == "length"


def test_a_request_without_a_model_gets_the_served_one(raw):
    for body in ({k: v for k, v in CHAT.items() if k != "model"}, {**TEXT, "model": None}):
        path = "/chat/completions" if "messages" in body else "/completions"
        reply = raw.post(path, body)
        assert reply["model"] == MODEL and reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'"text"', b"", b"\xff\xfe{}",
                                  b'{"model": ' * 10])
def test_bodies_that_are_not_a_json_object(raw, body):
    status, reply = raw.call("POST", "/chat/completions", body)
    check_error(status, reply)
    assert status == 400


def test_oversized_bodies_and_prompts(raw):
    huge = dict(CHAT, messages=[{"role": "user", "content": "x" * (5 << 20)}])
    status, reply = raw.call("POST", "/chat/completions", huge)
    check_error(status, reply)
    assert status == 413
    # a prompt longer than the context (1024 tokens)
    status, reply = raw.call("POST", "/completions", dict(TEXT, prompt=[42] * 1100))
    check_error(status, reply)
    assert reply["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required(smol_server):
    for key in (None, "wrong"):
        status, reply = Raw(smol_server.base, key).call("POST", "/chat/completions", CHAT)
        check_error(status, reply)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = Raw(smol_server.base, None).call(
        "GET", "/v1/models", headers={"Authorization": "Basic dGVzdA=="}, prefix=False)
    assert status == 401


@pytest.mark.parametrize("choice", ["sometimes", {"type": "function"},
                                    {"type": "function", "function": {"name": "nope"}},
                                    {"type": "code", "function": {"name": "f"}}])
def test_tool_choice_must_name_a_tool(raw, choice):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, reply = raw.call("POST", "/chat/completions",
                             dict(CHAT, tools=tools, tool_choice=choice))
    check_error(status, reply)
    assert status == 400 and reply["error"]["param"] == "tool_choice"


def test_unknown_routes_and_methods(raw):
    for method, path, want in (("GET", "/chat/completions", 405), ("POST", "/nowhere", 404),
                               ("GET", "/models/gpt-4", 404), ("DELETE", "/models", 405)):
        status, reply = raw.call(method, path)
        check_error(status, reply)
        assert status == want
    assert raw.health()["status"] == "ok"
