"""The tool-call grammar on a tiny model's byte-level vocabulary: under "auto" with a strict
tool it admits free text (every text token), and calls (tagged, or a bare reply) whose
arguments follow the tool's parameters, and refuses calls that do not; forced calls admit
calls only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

import diptych
from diptych.errors import InvalidArgumentError

from ..tiny_models import save_hf_folder, tiny_hf_model

pytest.importorskip("llguidance")
from diptych.server.tool_grammar import tool_constraint  # noqa: E402

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "JST"]},
                                     "hours": {"type": "integer"}},
    "required": ["zone", "hours"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}}}}
TOOLS = [NOTE, TIME]
STRICT = {"get_time"}


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


GOOD_JSON = '{"name": "get_time", "arguments": {"zone": "JST", "hours": 9}}'
GOOD = call(GOOD_JSON)
BARE = ["  " + GOOD_JSON, "```json\n" + GOOD_JSON + "\n```",
        '{\n  "name": "get_time",\n  "arguments": {\n    "zone": "UTC",\n    "hours": 1\n  }\n}']
COMPACT = call('{"name":"get_time","arguments":{"zone":"UTC","hours":-2}}')
NOTE_CALL = call('{"name": "note", "arguments": {"text": 5, "extra": [1]}}')  # not strict
WRONG = [call('{"name": "get_time", "arguments": {"zone": "CET", "hours": 9}}'),   # enum
         call('{"name": "get_time", "arguments": {"zone": "UTC", "hours": "9"}}'),  # type
         call('{"name": "get_time", "arguments": {"zone": "UTC"}}'),                # required
         call('{"name": "get_time", "arguments": {"zone": "UTC", "hours": 1, "x": 2}}'),
         call('{"name": "set_time", "arguments": {}}'),                             # no tool
         call('{"name": "get_time", "arguments": {"zone": "UTC",   "hours": 1}}')]  # spaces


@pytest.fixture(scope="module")
def tiny():
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_folder(tiny_hf_model("qwen2", vocab_size=320), Path(tmp) / "m",
                                tokenizer="bpe")
        yield diptych.load(str(folder), n_ctx=64)


def follows(model, choice, text: str, reply_schema=None) -> bool:
    """Whether the grammar admits `text` whole (each token allowed by the mask before it,
    and the grammar complete at the end)."""
    grammar = tool_constraint(model.tokenizer, model.config.vocab_size, TOOLS, choice, STRICT,
                              reply_schema)
    for token in model.tokenizer.encode(text, add_bos=False):
        if not grammar.allowed()[token]:
            return False
        grammar.advance(token)
    return grammar.matcher.is_accepting()


def test_auto_with_a_strict_tool_admits_text_and_valid_calls(tiny):
    for text in ("Plain text, {json-ish} <b>tags</b> and a < sign.\n", "", GOOD, COMPACT,
                 "Let me look.\n" + GOOD + "\n" + NOTE_CALL + "\n{Done}.",
                 "```python\nprint({1: 2})\n```", *BARE):
        assert follows(tiny, "auto", text), text
    for wrong in WRONG:
        assert not follows(tiny, "auto", "Sure. " + wrong), wrong
        assert not follows(tiny, "auto", wrong.removeprefix("<tool_call>\n")
                           .removesuffix("\n</tool_call>")), wrong   # bare
    # a reply that opens with a JSON object is read as a call, so it must be one
    assert not follows(tiny, "auto", '{"zone": "UTC"}')
    assert not follows(tiny, "auto", '```json\n{"zone": "UTC"}\n```')


def test_free_text_is_not_steered(tiny):
    """In text the mask admits every token that is text (its bytes are UTF-8 where they
    stand) and the end-of-generation tokens, before and after a call; no other control
    token."""
    tok, n = tiny.tokenizer, tiny.config.vocab_size
    eog = np.isin(np.arange(n), list(tok.eog_ids))
    control = np.array([tok.is_special(i) for i in range(n)]) & ~eog
    text = np.array([not tok.is_special(i) and _is_utf8(tok.token_bytes(i)) for i in range(n)])
    assert text.sum() > 100
    for before in ("", "Hi " + GOOD + " ok"):
        grammar = tool_constraint(tok, n, TOOLS, "auto", STRICT)
        for token in tok.encode(before, add_bos=False):
            grammar.advance(token)
        allowed = grammar.allowed()
        assert allowed[text | eog].all() and not allowed[control].any()


def _is_utf8(data: bytes) -> bool:
    return data.decode("utf-8", "replace").encode() == data


def test_forced_calls_admit_calls_only(tiny):
    note = call('{"name": "note", "arguments": {"text": "hi"}}')
    assert follows(tiny, "required", GOOD + "\n" + note)
    assert not follows(tiny, "required", NOTE_CALL)   # forced: every tool's parameters hold
    assert follows(tiny, {"name": "get_time"}, COMPACT)
    assert all(follows(tiny, choice, bare) for bare in BARE
               for choice in ("required", {"name": "get_time"}))
    for choice in ("required", {"name": "get_time"}):
        assert not follows(tiny, choice, "Hello")
        assert not follows(tiny, choice, "Sure. " + GOOD)
        assert not any(follows(tiny, choice, wrong) for wrong in WRONG)
    assert not follows(tiny, {"name": "get_time"}, NOTE_CALL)
    assert not follows(tiny, {"name": "get_time"}, GOOD + "\n" + GOOD)


def test_strict_tools_beside_a_response_format_admit_calls_or_the_json(tiny):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert follows(tiny, "auto", GOOD, schema)
    assert follows(tiny, "auto", '{"ok":true}', schema)
    assert not follows(tiny, "auto", "Hello", schema)
    assert not follows(tiny, "auto", '{"ok": 1}', schema)


def test_no_grammar_without_a_strict_tool_and_bad_schemas_are_refused(tiny):
    tok, n = tiny.tokenizer, tiny.config.vocab_size
    assert tool_constraint(tok, n, TOOLS, "auto", set()) is None
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(InvalidArgumentError, match="tools"):
        tool_constraint(tok, n, [broken], "auto", {"f"})
