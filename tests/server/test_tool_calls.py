"""Tool calls: the parser on streamed text (calls as OpenAI's deltas, arguments in
fragments), and a round trip through the real server with Qwen2.5-Coder-0.5B and the openai
client's types and streaming helper."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from diptych.server.tool_calls import ToolCallParser, collect

from .conftest import Raw, ServerProcess

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def feed_in_pieces(text: str, size: int, constrained: bool = False
                   ) -> list[tuple[str, str, list[dict]]]:
    """(the text fed, the content out, the deltas out) per feed; the finish as a last feed
    of "". `constrained`: the reply follows a tool grammar."""
    parser, steps = ToolCallParser({"get_weather"}, constrained), []
    for i in range(0, len(text), size):
        steps.append((text[i:i + size], *parser.feed(text[i:i + size])))
    steps.append(("", *parser.finish()))
    return steps


def parse_in_pieces(text: str, size: int) -> tuple[str, list[dict]]:
    steps = feed_in_pieces(text, size)
    return "".join(c for _, c, _ in steps), collect([d for _, _, ds in steps for d in ds])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_calls_are_found_however_the_text_is_split(size):
    content, calls = parse_in_pieces("Let me check.\n" + CALL + "\n" + CALL.replace(
        "Paris", "Oslo"), size)
    assert content == "Let me check.\n\n"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                       {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text", ["a < b and <tool", "<tool_call>not json</tool_call> after",
                                  "<tool_call>[1, 2]</tool_call>", "plain <tool_calls> text"])
def test_text_that_is_not_a_call_stays_content(text):
    for size in (1, 1000):
        assert parse_in_pieces(text, size) == (text, [])


@pytest.mark.parametrize("text", ['{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                  '```json\n{"name": "get_weather", "arguments": '
                                  '{"city": "Paris"}}\n```'])
def test_a_reply_that_is_only_a_call_is_a_call(text):
    for size in (1, 1000):
        content, calls = parse_in_pieces(text, size)
        assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {
            "city": "Paris"}


@pytest.mark.parametrize("text", ['{"name": "send_mail", "arguments": {}}', '{"a": 1}',
                                  "```python\nprint(1)\n```"])
def test_json_that_calls_no_tool_of_the_request_is_content(text):
    assert parse_in_pieces(text, 2) == (text, [])


def test_a_bare_call_followed_by_more_text_is_content():
    """As small models write after a tool's result: the call again, then other text."""
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"celsius": 31}'
    assert parse_in_pieces(text, 1) == (text, [])


def test_an_unclosed_call_at_the_end_still_counts():
    content, calls = parse_in_pieces(CALL.removesuffix("</tool_call>"), 2)
    assert content == "" and calls[0]["function"]["name"] == "get_weather"


ARGUMENTS = '{"q": "a } b ] </tool_call> \\" {", "n": [1, {"x": [2]}], "e": {}}'


@pytest.mark.parametrize("reply,constrained", [
    ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": ' + ARGUMENTS
     + '}\n</tool_call>\nDone.', False),
    ('```json\n{"name": "get_weather", "arguments": ' + ARGUMENTS + '}\n```', True)])
def test_arguments_stream_as_the_model_writes_them(reply, constrained):
    """Fed a character at a time: the first delta names the call, each later character of
    the arguments comes out as soon as it is fed, and nothing after their closing brace (a
    bare call: where a tool grammar makes it the whole reply)."""
    steps = feed_in_pieces(reply, 1, constrained)
    deltas = [d for _, _, ds in steps for d in ds]
    first, rest = deltas[0], deltas[1:]
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["type"] == "function" and first["function"] == {"name": "get_weather",
                                                                  "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
               and d["index"] == 0 for d in rest)
    assert "".join(d["function"]["arguments"] for d in rest) == ARGUMENTS
    streamed = [(fed, ds[0]["function"]["arguments"]) for fed, _, ds in steps
                if ds and ds[0] is not first]
    assert all(fed == out for fed, out in streamed) and len(streamed) == len(ARGUMENTS) - 1
    content = "".join(c for _, c, _ in steps)
    assert content == ("Checking.\n\nDone." if reply.startswith("Checking") else "")


def test_a_call_whose_name_comes_last_is_sent_whole_at_its_close():
    body = '{"arguments": {"city": "Oslo"}, "name": "get_weather"}'
    steps = feed_in_pieces(f"<tool_call>{body}</tool_call> ok", 1)
    deltas = [(fed, d) for fed, _, ds in steps for d in ds]
    assert len(deltas) == 1 and deltas[0][0] == ">"   # the tag's last character
    assert json.loads(deltas[0][1]["function"]["arguments"]) == {"city": "Oslo"}
    assert "".join(c for _, c, _ in steps) == " ok"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

STRICT_WEATHER = {"type": "function", "function": dict(WEATHER["function"], strict=True)}


@pytest.fixture(scope="module")
def qwen_client(qwen_path):
    server = ServerProcess(qwen_path, "--n-ctx", "1024")
    yield openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=300)
    server.close()


@pytest.mark.real
def test_tool_call_round_trip(qwen_client):
    model = qwen_client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    reply = qwen_client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                                max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # the same, streamed through the client's helper, which adds the arguments' fragments
    # up (strict: the grammar makes a reply that opens with a call that call alone, so even
    # the untagged call this model writes streams as it comes)
    with qwen_client.chat.completions.stream(model=model, messages=messages,
                                             tools=[STRICT_WEATHER], max_tokens=40,
                                             temperature=0) as stream:
        events = list(stream)
        streamed = stream.get_final_completion().choices[0]
    fragments = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(fragments) > 1 and {e.index for e in fragments} == {0}
    assert [(c.function.name, c.function.parsed_arguments)
            for c in streamed.message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert streamed.finish_reason == "tool_calls"

    messages += [choice.message,
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature_celsius": 31, "sky": "clear"})}]
    final = qwen_client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                                max_tokens=40, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls
    assert "31" in final.choices[0].message.content


@pytest.mark.real
def test_a_call_cut_by_max_tokens_finishes_with_length(qwen_client):
    """As OpenAI's API: the call's tokens all came, but the reply ended at max_tokens."""
    model = qwen_client.models.list().data[0].id
    ask = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
               tools=[WEATHER], tool_choice="required", temperature=0)
    whole = qwen_client.chat.completions.create(max_tokens=40, **ask)
    assert whole.choices[0].finish_reason == "tool_calls"
    n = whole.usage.completion_tokens   # the call, then the end-of-generation token
    cut = qwen_client.chat.completions.create(max_tokens=n - 1, **ask)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.tool_calls[0].function.arguments == \
        whole.choices[0].message.tool_calls[0].function.arguments


TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET", "JST"]},
        "format": {"type": "string", "enum": ["12h", "24h"]}},
        "required": ["zone", "format"], "additionalProperties": False}}}


@pytest.mark.real
@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_a_forced_call_follows_the_tools_schema(qwen_client, choice):
    model = qwen_client.models.list().data[0].id
    reply = qwen_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice=choice, max_tokens=40, temperature=0.8, seed=3)
    assert reply.choices[0].finish_reason == "tool_calls"
    call = reply.choices[0].message.tool_calls[0].function
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.name]
    if choice != "required":
        assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])


STRICT_TIME = {"type": "function", "function": dict(TIME["function"], strict=True)}
ASK_TIME = [{"role": "user", "content": "What time is it in Tokyo?"}]


@pytest.mark.real
def test_strict_arguments_follow_the_schema_when_sampling(qwen_client):
    """Without the grammar the model names zones the enum does not hold ("Tokyo"); with
    `strict` every call it makes validates, sampled or speculative."""
    model = qwen_client.models.list().data[0].id

    def calls(tool, seed, **extra):
        reply = qwen_client.chat.completions.create(
            model=model, messages=ASK_TIME, tools=[tool], max_tokens=48, temperature=0.8,
            seed=seed, **extra)
        return [json.loads(c.function.arguments) for c in reply.choices[0].message.tool_calls
                or []]

    def valid(arguments) -> bool:
        return jsonschema.Draft202012Validator(TIME["function"]["parameters"]).is_valid(
            arguments)

    assert not all(valid(a) for a in calls(TIME, 1))
    strict = [a for seed in (1, 2) for a in calls(STRICT_TIME, seed)]
    strict += calls(STRICT_TIME, 3, extra_body={"speculative": "lookup"})
    assert len(strict) == 3 and all(valid(a) for a in strict), strict


@pytest.mark.real
def test_a_plain_reply_is_the_same_with_strict_tools(qwen_client):
    model = qwen_client.models.list().data[0].id
    ask = [{"role": "user", "content": "Write a haiku about the sea."}]
    replies = [qwen_client.chat.completions.create(
        model=model, messages=ask, tools=[tool], max_tokens=24, temperature=0).choices[0]
        for tool in (TIME, STRICT_TIME)]
    assert not any(r.message.tool_calls for r in replies)
    assert replies[0].message.content and replies[1].message.content == \
        replies[0].message.content


@pytest.mark.real
@pytest.mark.parametrize("function,param", [
    ({"name": "f", "strict": "yes"}, "tools[0].function.strict"),
    ({"name": "f", "strict": True, "parameters": {"type": "nonsense"}}, "tools")])
def test_strict_must_be_a_boolean_and_its_schema_usable(smol_server, function, param):
    status, reply = Raw(smol_server.base).call("POST", "/chat/completions", {
        "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1, "tools": [{"type": "function", "function": function}]})
    assert status == 400 and reply["error"]["param"] == param, reply
