"""Tool calls in a model's output -> OpenAI's `tool_calls`.

Qwen2.5, Qwen3 and other Hermes-style templates have the model write each call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. `ToolCallParser` takes the
text as it streams: text outside the tags is content (a possible start of a tag is held
back until it is decided), each closed tag becomes a call. A tag whose body is not a call
(not JSON, no name) stays in the content, so nothing the model wrote is lost.

Small models (Qwen2.5-Coder-0.5B) often write the call's JSON without the tags; a reply
that is one such object (or one in a ```json fence) naming a tool of the request is a call
too. A reply that starts like one is held back until it ends, to tell which it is.
"""

from __future__ import annotations

import json
import secrets

OPEN, CLOSE = "<tool_call>", "</tool_call>"


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


class ToolCallParser:
    """Splits a reply into content and calls; `names` are the request's tools."""

    def __init__(self, names: set[str]):
        self.names = names
        self._pending = ""
        self._inside = False
        self._bare: bool | None = None   # whether the reply may be an untagged call

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content that is certain now, calls completed now)."""
        self._pending += text
        if self._bare is None:
            start = self._pending.lstrip()
            if not start or (len(start) < 3 and "```".startswith(start)):
                return "", []
            self._bare = start[0] == "{" or start.startswith("```")
        if self._bare:
            return "", []
        content, calls = [], []
        while True:
            if not self._inside:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._pending, OPEN)
                    content.append(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content.append(self._pending[:at])
                self._pending, self._inside = self._pending[at:], True
            end = self._pending.find(CLOSE)
            if end < 0:
                break
            raw = self._pending[:end + len(CLOSE)]
            call = _parse_call(raw[len(OPEN):-len(CLOSE)])
            if call is None:
                content.append(raw)
            else:
                calls.append(call)
            self._pending, self._inside = self._pending[end + len(CLOSE):], False
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end: an unclosed tag is a call if its body is one."""
        rest, self._pending = self._pending, ""
        if self._bare:
            call = _parse_call(_unfence(rest), self.names)
            return ("", [call]) if call is not None else (rest, [])
        if self._inside:
            self._inside = False
            call = _parse_call(rest[len(OPEN):])
            if call is not None:
                return "", [call]
        return rest, []


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
