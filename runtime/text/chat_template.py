"""Rendering a model's chat template (Jinja2, sandboxed) the way transformers does.

A chat template comes from the model file (`tokenizer.chat_template`), so it is untrusted code.
It runs in `template_sandbox.BoundedSandbox`: jinja2's `ImmutableSandboxedEnvironment` (no
attribute starting with "_", no mutation of lists/dicts, `range` capped) with its time, the
size of every value it builds and its output bounded, and one tightening: an unsafe attribute
access raises at once instead of rendering as an empty string.

The environment matches transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension ({% break %}/{% continue %}), a `{% generation %}` block (rendered
as its body; `render_chat_spans` also returns where each one's text landed, the assistant text
training learns from), the globals `raise_exception(msg)` and `strftime_now(fmt)`, and a `tojson` filter
that writes JSON without HTML escaping (`ensure_ascii=False`, optional `indent`, `separators`,
`sort_keys`). The variables are `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`tools` and any extra keyword given to `render_chat`.

Every failure -- a syntax error, `raise_exception`, a sandbox violation, an error inside the
template -- is a `diptych.errors.ChatTemplateError`; a malformed message list is an
`InvalidArgumentError`.

When a file has no template, `DEFAULT_CHAT_TEMPLATE` (ChatML, the format of SmolLM2 and Qwen:
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``
when a reply is wanted) is used. It suits models trained on ChatML; for other base models it is
only a reasonable plain-text framing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import SecurityError

from diptych.errors import ChatTemplateError, InvalidArgumentError
from .template_sandbox import BoundedSandbox, bounded_render

__all__ = ["DEFAULT_CHAT_TEMPLATE", "render_chat", "render_chat_spans", "validate_messages",
           "compile_template"]

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

class _RaisedByTemplate(Exception):
    """What `raise_exception` raises inside the template (turned into ChatTemplateError)."""


# what a marking environment writes around each {% generation %} body (private-use
# characters, refused in messages by `render_chat_spans`)
_GEN_START, _GEN_END = "\ue000gen\ue001", "\ue001gen\ue000"


class _GenerationBlock(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for
    training masks): its body, between markers when the environment marks them."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        if not self.environment.mark_generation:
            return body
        return ([nodes.Output([nodes.TemplateData(_GEN_START)])] + body
                + [nodes.Output([nodes.TemplateData(_GEN_END)])])


class _Sandbox(BoundedSandbox):
    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            f"object is unsafe")


def _raise_exception(message: Any = "") -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=2)
def _environment(mark_generation: bool = False) -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.extend(mark_generation=mark_generation)
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def compile_template(template: str, mark_generation: bool = False) -> jinja2.Template:
    """The compiled template (cached); a syntax error is a ChatTemplateError."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a str, not {type(template).__name__}")
    try:
        return _environment(mark_generation).from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"malformed chat template (line {e.lineno}): {e.message}") from e
    except (jinja2.TemplateError, SecurityError) as e:
        raise ChatTemplateError(f"malformed chat template: {e}") from e


def validate_messages(messages: Any) -> None:
    """Check that `messages` is a list of {"role": str, "content": str} dicts (content may be
    None or absent on an assistant message that carries "tool_calls")."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                       f"not {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidArgumentError(f"messages[{i}] needs a non-empty string 'role' "
                                       f"(got {role!r})")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if content is None and m.get("tool_calls"):
            continue
        if "content" not in m:
            raise InvalidArgumentError(f"messages[{i}] (role {role!r}) has no 'content'")
        raise InvalidArgumentError(f"messages[{i}]['content'] must be a str, "
                                   f"not {type(content).__name__}")


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None,
                **extra: Any) -> str:
    """Render `messages` with the Jinja chat `template` (None: `DEFAULT_CHAT_TEMPLATE`).

    add_generation_prompt: end with the header of an assistant turn, so the model replies.
    bos_token / eos_token: the texts templates write as `{{ bos_token }}` / `{{ eos_token }}`
        (the rendered text is then tokenized with parse_special=True and without an extra BOS).
    tools: a list of tool (function) descriptions, for templates that support them.
    extra: further template variables (e.g. `date_string`, `enable_thinking`).
    """
    return _render(template, messages, False, add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)


def render_chat_spans(template: str | None, messages: list[dict], **kwargs
                      ) -> tuple[str, list[tuple[int, int]]] | None:
    """`render_chat`'s text and the character ranges of it that `{% generation %}` blocks
    wrote, or None when the template has no such block."""
    if not re.search(r"\{%-?\s*generation\b", template or ""):
        return None
    for i, m in enumerate(messages):
        if isinstance(m, Mapping) and any(c in str(m.get("content") or "")
                                          for c in "\ue000\ue001"):
            raise InvalidArgumentError(f"messages[{i}] contains a private-use character "
                                       f"(U+E000 or U+E001) the renderer reserves")
    marked = _render(template, messages, True, **kwargs)
    text, spans, pos = [], [], 0
    for m in re.finditer(f"{_GEN_START}|{_GEN_END}", marked):
        text.append(marked[pos:m.start()])
        at = sum(map(len, text))
        if m.group() == _GEN_START:
            spans.append([at, None])
        elif spans and spans[-1][1] is None:
            spans[-1][1] = at
        pos = m.end()
    text.append(marked[pos:])
    return "".join(text), [(a, b) for a, b in spans if b is not None and b > a]


def _render(template: str | None, messages: list[dict], mark_generation: bool, *,
            add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
            tools: list[dict] | None = None, **extra: Any) -> str:
    validate_messages(messages)
    compiled = compile_template(DEFAULT_CHAT_TEMPLATE if template is None else template,
                                mark_generation)
    try:
        return bounded_render(compiled, messages=messages,
                              add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                              eos_token=eos_token, tools=tools, **extra)
    except _RaisedByTemplate as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"the chat template tried to leave its sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from e
    except RecursionError as e:
        raise ChatTemplateError("the chat template recursed too deeply") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
            MemoryError) as e:
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
