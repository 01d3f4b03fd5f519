"""What a chat reply may be when its request offers tools, as one llguidance grammar (lark
syntax, each call's JSON through `%json`): the one place tool grammars are built.

A call takes one of the forms tool_calls.ToolCallParser reads: the Hermes block
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, or a reply that is only the
call's JSON (bare or in a ```json fence), which small models such as Qwen2.5-Coder-0.5B
write. Qwen's vocabularies hold ``<tool_call>`` as one token whose bytes are that text
(user-defined, not a control token), so the grammar's string admits that token as well as
the same text written in pieces.

- `tool_choice` "required": the reply is one or more call blocks, or a bare call; a named
  function: one call of it. The arguments follow each tool's parameters, strict or not.
- "auto" with a strict tool (`function.strict: true` in the request): free text with call
  blocks anywhere in it, or a bare call. The text is a lazy lexeme that ends at the first
  ``<tool_call>``, so until then the mask admits every text token and the end-of-generation
  tokens: ordinary replies are not steered. Only a reply that opens with a JSON object
  (what the parser would read as a bare call) must be a call. A call names one of the
  tools; a strict tool's arguments follow its parameters, another's are any object. With a
  `response_format` schema as well, the reply is either call blocks or that JSON value.
- "auto" without strict tools: no grammar; the reply is parsed as it comes.
"""

from __future__ import annotations

import json

from diptych.inference.constraint import GrammarConstraint, compact, lark_grammar

from .tool_calls import CLOSE, OPEN

# between two JSON tokens of a call: nothing, a space (json.dumps' ", " and ": "), or a line
# break and an indent (pretty-printed, as models write bare calls); bounded, so a weak model
# cannot pad a call with whitespace until max_tokens
CALL_JSON = {"whitespace_pattern": "( |\n[ \t]{0,32})"}
ANY_ARGUMENTS = {"type": "object"}

# the rules besides `start` and the calls `fn_<i>`
RULES = rf"""
calls: call ("\n" call)*
call: {json.dumps(OPEN)} body {json.dumps(CLOSE)}
body: "\n"? fn "\n"?
bare: BARE_OPEN? fn BARE_CLOSE?
BARE_OPEN: /\s*(```(json)?\s*)?/
BARE_CLOSE: /\s*(```\s*)?/
opening_call: opening_text body {json.dumps(CLOSE)}
opening_text[lazy]: OPENING {json.dumps(OPEN)}
text_call: text_open body {json.dumps(CLOSE)}
text_open[lazy]: TEXT {json.dumps(OPEN)}
TEXT: /(.|\n)*/
OPENING: /(.|\n)*/ & ~/\s*(```[a-z]*\s*)?\{{(.|\n)*/
"""


def call_schema(name: str, arguments: dict) -> dict:
    """One call of tool `name` as JSON: the name first, so a stream knows it early."""
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": CALL_JSON}


def constrains(choice: str | dict, strict: set[str]) -> bool:
    """Whether a reply to tools with `tool_choice` `choice` and `strict` ones follows a
    grammar."""
    return choice != "auto" or bool(strict)


def tool_grammar(tools: list[dict], choice: str | dict, strict: set[str],
                 reply_schema: dict | bool | None = None) -> str | None:
    """The lark grammar of a reply to a request with `tools` and `tool_choice` `choice`
    ("auto", "required", or {"name": ...} of the function named); None where the reply is
    free (auto, no strict tool). `strict`: the names of the strict tools; `reply_schema`:
    the response_format's schema."""
    if not constrains(choice, strict):
        return None
    forced = choice != "auto"
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["name"]]
    fns = []
    for t in tools:
        fn = t["function"]
        arguments = fn.get("parameters") or ANY_ARGUMENTS
        if not forced and fn["name"] not in strict:
            arguments = ANY_ARGUMENTS
        fns.append(f"%json {json.dumps(call_schema(fn['name'], arguments))}")
    if isinstance(choice, dict):
        start = "bare | call"
    elif forced:
        start = "bare | calls"
    elif reply_schema is not None:
        start = f"calls | reply\nreply: %json {json.dumps(compact(reply_schema))}"
    else:
        start = "bare | OPENING | opening_call text_call* TEXT"
    return "\n".join(["%llguidance {}", f"start: {start}", RULES.strip(),
                      "fn: " + " | ".join(f"fn_{i}" for i in range(len(fns))),
                      *(f"fn_{i}: {body}" for i, body in enumerate(fns))])


def tool_constraint(tokenizer, n_vocab: int, tools: list[dict], choice: str | dict,
                    strict: set[str], reply_schema: dict | bool | None = None
                    ) -> GrammarConstraint | None:
    """The grammar of the reply (see `tool_grammar`), or None."""
    grammar = tool_grammar(tools, choice, strict, reply_schema)
    return None if grammar is None else GrammarConstraint(tokenizer, n_vocab,
                                                          lark_grammar(grammar), "tools")
