"""A request's JSON body -> `GenerationRequest`, or an `APIError` naming the field.

Fields follow OpenAI's API (plus top_k, min_p and repetition_penalty, as llama-server and
vLLM take them, and diptych's speculative decoding options: speculative, draft_max,
lookup_ngram, as `Model.stream` names them); a field the server does not know is refused rather than ignored, so a
client never believes an option took effect when it did not. Sampling fields that are
absent or null keep the model's defaults (`Model.sampling`), as `diptych run` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import APIError, invalid

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16
# fields OpenAI's clients may send that change nothing here
IGNORED = {"user", "store", "metadata", "parallel_tool_calls", "service_tier"}
SAMPLING = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "logit_bias"}
SPECULATIVE = {"speculative", "draft_max", "lookup_ngram"}
COMMON = SAMPLING | IGNORED | SPECULATIVE | {"model", "max_tokens", "stop", "n", "stream",
                                            "stream_options"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "response_format", "tools", "tool_choice"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}


@dataclass
class GenerationRequest:
    """What one request asks for, checked. `messages` (chat) or `prompt` (completions: a
    string or token ids) is turned into token ids by the app, off the event loop."""

    chat: bool
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None     # None: off; n: the chosen token's and the top n
    tools: list[dict] | None = None
    # with tools: "auto", "required", or {"name": ...} of the function a call must be
    tool_choice: str | dict = "auto"
    strict: set[str] = field(default_factory=set)   # tools whose calls follow their schema
    json_schema: dict | bool | None = None   # response_format: what the output must follow
    # speculative decoding: "draft", "lookup", None (plain), or absent: the server's choice
    speculative: str | None = "default"
    draft_max: int | None = None
    lookup_ngram: int | None = None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def check_model(body: dict, served: str) -> None:
    """A request names the served model, or none (as llama-server and mlx-lm's server
    take it: the one model there is); another name is a 404."""
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise invalid(f"'model' must be a string, not {_kind(name)}", "model")
    if name != served:
        raise APIError(404, f"The model '{name}' does not exist; this server serves "
                       f"'{served}'", param="model", code="model_not_found")


def chat_request(body: dict, served: str, max_tokens_limit: int) -> GenerationRequest:
    _known(body, CHAT_FIELDS)
    check_model(body, served)
    req = GenerationRequest(chat=True, messages=_messages(body.get("messages")))
    _common(body, req, max_tokens_limit)
    limit = _integer(body, "max_completion_tokens", 1, max_tokens_limit)
    if limit is not None:
        req.max_tokens = limit if req.max_tokens is None else min(limit, req.max_tokens)
    top = _integer(body, "top_logprobs", 0, 20)
    if _boolean(body, "logprobs"):
        req.logprobs = top or 0
    elif top is not None:
        raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    req.json_schema = _response_format(body.get("response_format"))
    req.tools, req.tool_choice, req.strict = _tools(body.get("tools"), body.get("tool_choice"))
    if req.tool_choice != "auto" and req.json_schema is not None:
        raise invalid("'tool_choice' that forces a call and 'response_format' conflict",
                      "tool_choice")
    return req


def completion_request(body: dict, served: str, max_tokens_limit: int) -> GenerationRequest:
    _known(body, COMPLETION_FIELDS)
    check_model(body, served)
    req = GenerationRequest(chat=False, prompt=_prompt(body.get("prompt")))
    _common(body, req, max_tokens_limit)
    req.logprobs = _integer(body, "logprobs", 0, 5)
    if _boolean(body, "echo"):
        raise invalid("'echo' is not supported", "echo")
    if body.get("suffix") not in (None, ""):
        raise invalid("'suffix' (fill in the middle) is not supported", "suffix")
    if _integer(body, "best_of", 1, 1) not in (None, 1):
        raise invalid("'best_of' must be 1", "best_of")
    return req


def _common(body: dict, req: GenerationRequest, max_tokens_limit: int) -> None:
    req.max_tokens = _integer(body, "max_tokens", 1, max_tokens_limit)
    if _integer(body, "n", 1, 1) not in (None, 1):
        raise invalid("'n' must be 1: the server gives one choice per request", "n")
    req.stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true",
                          "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("'stream_options' must be an object with 'include_usage'",
                          "stream_options")
        req.include_usage = bool(_boolean(options, "include_usage", "stream_options."))
    req.stop = _stops(body.get("stop"))
    s = req.sampling
    s["temperature"] = _number(body, "temperature", 0.0, 2.0)
    s["top_p"] = _number(body, "top_p", 0.0, 1.0, low_open=True)
    s["top_k"] = _integer(body, "top_k", 0, 1 << 31)
    s["min_p"] = _number(body, "min_p", 0.0, 1.0, high_open=True)
    s["repetition_penalty"] = _number(body, "repetition_penalty", 0.0, 10.0, low_open=True)
    s["presence_penalty"] = _number(body, "presence_penalty", -2.0, 2.0)
    s["frequency_penalty"] = _number(body, "frequency_penalty", -2.0, 2.0)
    s["seed"] = _integer(body, "seed", 0, 2**63 - 1)
    s["logit_bias"] = _logit_bias(body.get("logit_bias"))
    if "speculative" in body:
        mode = body["speculative"]
        if mode not in ("draft", "lookup", "none", None):
            raise invalid("'speculative' must be 'draft', 'lookup' or 'none'", "speculative")
        req.speculative = None if mode in ("none", None) else mode
    req.draft_max = _integer(body, "draft_max", 1, 1 << 10)
    req.lookup_ngram = _integer(body, "lookup_ngram", 1, 16)


def _known(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), "?")


def _number(body: dict, name: str, lo: float, hi: float, *, low_open=False,
            high_open=False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number, not {_kind(value)}", name)
    if value < lo or value > hi or (low_open and value == lo) or (high_open and value == hi):
        raise invalid(f"'{name}' must be in {'(' if low_open else '['}{lo:g}, {hi:g}"
                      f"{')' if high_open else ']'}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, not {_kind(value)}", name)
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _boolean(body: dict, name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"'{prefix}{name}' must be a boolean, not {_kind(value)}", prefix + name)
    return value


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise invalid(f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def _logit_bias(value) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must map token ids to numbers", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}",
                          "logit_bias") from None
        if token < 0 or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not -100 <= bias <= 100:
            raise invalid(f"'logit_bias' maps token ids >= 0 to numbers in [-100, 100], got "
                          f"{key!r}: {bias!r}", "logit_bias")
        out[token] = float(bias)
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]   # one prompt in an array
    if isinstance(value, str):
        if not value:
            raise invalid("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
        raise invalid("one prompt per request: 'prompt' holds several", "prompt")
    raise invalid("'prompt' must be a non-empty string or an array of token ids", "prompt")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array", "messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, m) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"'{where}' must be an object, not {_kind(m)}", where)
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}",
                      f"{where}.role")
    out = {"role": "system" if role == "developer" else role,
           "content": _content(m.get("content"), f"{where}.content")}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise invalid(f"'{where}.tool_calls' is only for assistant messages",
                          f"{where}.tool_calls")
        out["tool_calls"] = _past_calls(calls, f"{where}.tool_calls")
    elif out["content"] is None:
        raise invalid(f"'{where}.content' is missing", f"{where}.content")
    for key in ("name", "tool_call_id"):
        if key in m:
            if not isinstance(m[key], str):
                raise invalid(f"'{where}.{key}' must be a string", f"{where}.{key}")
            out[key] = m[key]
    if role == "tool" and "tool_call_id" not in out:
        raise invalid(f"'{where}' (a tool result) needs 'tool_call_id'", where)
    return out


def _content(value, where: str) -> str | None:
    """A message's text: a string, or an array of text parts joined."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise invalid(f"'{where}' parts must be text parts ({{\"type\": \"text\", "
                              f"\"text\": ...}}); this model takes text only, got {kind!r}",
                              where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"'{where}' must be a string or an array of text parts, not {_kind(value)}",
                  where)


def _past_calls(calls, where: str) -> list[dict]:
    """An assistant message's earlier tool calls, with their JSON arguments as objects (what
    chat templates expect)."""
    if not isinstance(calls, list):
        raise invalid(f"'{where}' must be an array", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments"), str):
            raise invalid(f"'{where}[{j}]' must be {{\"type\": \"function\", \"function\": "
                          f"{{\"name\": ..., \"arguments\": \"<json>\"}}}}", f"{where}[{j}]")
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            raise invalid(f"'{where}[{j}].function.arguments' is not valid JSON",
                          f"{where}[{j}].function.arguments") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _response_format(value) -> dict | bool | None:
    """The JSON schema `response_format` asks for: json_object is any object."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid("'response_format.json_schema' must be an object with a 'name' and "
                          "a 'schema'", "response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise invalid("'response_format.json_schema.schema' must be a JSON schema object",
                          "response_format.json_schema.schema")
        return schema
    raise invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                  "response_format")


def _tools(tools, choice) -> tuple[list[dict] | None, str | dict, set[str]]:
    """(the tools the template shows, or None; "auto", "required", or {"name": ...} of the
    function `tool_choice` names; the names of the strict tools). `strict` is the server's
    business, not the model's: the template does not show it."""
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None, "auto", set()
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array", "tools")
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not fn["name"] or not isinstance(fn.get("parameters", {}), dict):
            raise invalid(f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": "
                          f"{{\"name\": ..., \"parameters\": {{...}}}}}}", f"tools[{j}]")
        _boolean(fn, "strict", f"tools[{j}].function.")
    strict = {t["function"]["name"] for t in tools if t["function"].get("strict")}
    tools = [dict(t, function={k: v for k, v in t["function"].items() if k != "strict"})
             for t in tools]
    if choice in (None, "auto", "required"):
        return tools, choice or "auto", strict
    if choice == "none":
        return None, "auto", set()
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" \
            or not isinstance(name, str):
        raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": "
                      "\"function\", \"function\": {\"name\": <one of the tools>}}",
                      "tool_choice")
    if not any(t["function"]["name"] == name for t in tools):
        raise invalid(f"'tool_choice' names {name!r}, which is not among the tools",
                      "tool_choice")
    return tools, {"name": name}, strict
