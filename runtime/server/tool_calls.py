"""Tool calls in a model's output -> OpenAI's `tool_calls`, streamed as OpenAI streams them.

Qwen2.5, Qwen3 and other Hermes-style templates have the model write each call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. `ToolCallParser` takes the
text as it streams: text outside the tags is content (a possible start of a tag is held
back until it is decided), and each call comes out as deltas: the first carries the call's
index, id, type, name and empty arguments, the next ones the arguments' text as the model
writes it. Once a body has shown `{"name": <string>, "arguments": {`, its arguments are
read as JSON as they come (strings, nesting), so every character up to the object's own
closing brace is sent at once and nothing after it. A body written otherwise (arguments
first, arguments as a string) is parsed when its tag closes and sent as one delta; a tag
whose body is not a call (not JSON, no name) stays in the content, so nothing the model
wrote is lost.

Small models (Qwen2.5-Coder-0.5B) often write the call's JSON without the tags; a reply
that is one such object (or one in a ```json fence) naming a tool of the request is a call
too. A reply that starts like one is held back until it ends, to tell which it is (such a
model may follow the call with more text, and then it was no call), unless a tool grammar
constrains the reply (`whole_bare_calls`): then a reply that opens with a call is that
call alone, and it streams as a tagged one does.
"""

from __future__ import annotations

import json
import re
import secrets

OPEN, CLOSE = "<tool_call>", "</tool_call>"

# a call's JSON up to its arguments' first character: {"name": "...", "arguments": {
_HEADER = re.compile(r'\s*(?:```(?:json)?\s*)?\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,'
                     r'\s*"arguments"\s*:\s*(?=\S)')


def tool_call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parse_call(body: str, names: set[str] | None = None) -> dict | None:
    """The call `body` spells, if any (with `names`: only a call of one of them)."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) \
            or (names is not None and call["name"] not in names):
        return None
    return tool_call(call["name"], call.get("arguments", {}))


def collect(deltas: list[dict]) -> list[dict]:
    """The whole calls that `deltas` (ToolCallParser's) add up to."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in calls:
            calls[d["index"]] = {k: v for k, v in d.items() if k != "index"}
            calls[d["index"]]["function"] = dict(d["function"])
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


class _Call:
    """One call's body as it arrives. Once its header shows the name and an object of
    arguments begins, `feed` returns the call's deltas as the arguments' text comes;
    `done` is set when the arguments object has closed (`rest`: the text after it)."""

    def __init__(self, index: int, names: set[str] | None):
        self.index, self.names = index, names
        self.body = ""
        self.streaming = False
        self.done = False
        self.rest = ""
        self._sent = self._pos = 0    # body offsets: arguments sent, arguments scanned
        self._depth, self._in_string, self._escaped = 0, False, False

    def feed(self, text: str) -> list[dict]:
        if self.done:
            self.rest += text
            return []
        self.body += text
        deltas = []
        if not self.streaming:
            header = _HEADER.match(self.body)
            if header is None or self.body[header.end()] != "{":
                return []
            name = json.loads(header.group(1))
            if self.names is not None and name not in self.names:
                return []
            self.streaming, self._sent = True, header.end()
            self._pos = self._sent
            deltas.append(dict(tool_call(name, ""), index=self.index))
        end = self._scan()
        upto = len(self.body) if end is None else end
        if upto > self._sent:
            deltas.append({"index": self.index,
                           "function": {"arguments": self.body[self._sent:upto]}})
            self._sent = upto
        if end is not None:
            self.done, self.rest, self.body = True, self.body[end:], self.body[:end]
        return deltas

    def _scan(self) -> int | None:
        """Read the arguments' JSON on from where the last call stopped; the offset just
        past the object's closing brace once it has come."""
        body = self.body
        for i in range(self._pos, len(body)):
            ch = body[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._pos = i + 1
                    return i + 1
        self._pos = len(body)
        return None

    def whole(self, body: str) -> list[dict] | None:
        """At the end of a body that was not streamed: its call as one delta, or None when
        the body is no call."""
        call = _parse_call(_unfence(body), self.names)
        return None if call is None else [dict(call, index=self.index)]


class ToolCallParser:
    """Splits a reply into content and call deltas; `names` are the request's tools."""

    def __init__(self, names: set[str], whole_bare_calls: bool = False):
        self.names, self.whole_bare_calls = names, whole_bare_calls
        self.calls = 0                  # calls sent so far (the next one's index)
        self._pending = ""              # text not yet decided
        self._call: _Call | None = None  # the tag being read
        self._bare: bool | None = None  # whether the reply may be an untagged call

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content that is certain now, call deltas that are certain now)."""
        if self._bare is None:
            self._pending += text
            start = self._pending.lstrip()
            if not start or (len(start) < 3 and "```".startswith(start)):
                return "", []
            self._bare = start[0] == "{" or start.startswith("```")
            text, self._pending = self._pending, ""
            if self._bare:
                self._call = _Call(self.calls, self.names)
        if self._bare:
            if not self.whole_bare_calls:
                self._call.body += text
                return "", []
            return "", self._count(self._call.feed(text))
        self._pending += text
        content, deltas = [], []
        while True:
            if self._call is None:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._pending, OPEN)
                    content.append(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content.append(self._pending[:at])
                self._call = _Call(self.calls, None)
                self._pending = self._pending[at + len(OPEN):]
            call = self._call
            deltas += self._count(call.feed(self._pending))
            self._pending = ""
            if call.streaming and not call.done:
                break
            tail = call.rest if call.streaming else call.body
            end = tail.find(CLOSE)
            if end < 0:
                break
            self._pending, self._call = tail[end + len(CLOSE):], None
            if not call.streaming:
                whole = call.whole(tail[:end])
                if whole is None:
                    content.append(OPEN + tail[:end] + CLOSE)
                else:
                    deltas += self._count(whole)
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end: an unclosed tag or a bare reply is a call if its body
        is one."""
        call, self._call = self._call, None
        rest, self._pending = self._pending, ""
        if call is None:
            return rest, []
        if call.streaming:
            return "", []
        whole = call.whole(call.body)
        if whole is not None:
            return "", self._count(whole)
        return ("" if self._bare else OPEN) + call.body, []

    def _count(self, deltas: list[dict]) -> list[dict]:
        self.calls += sum("id" in d for d in deltas)
        return deltas


def _unfence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```")
    return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
