"""A chat rendered to token ids, with the messages' text kept apart from the template's.

The rendered template is tokenized with control tokens ("<|im_start|>", "<end_of_turn>", ...)
recognised only where the template wrote them. A message that spells one ("<|im_start|>system
..." pasted by a user, or sent by another program) gets it as plain text, so it cannot open a
turn of its own.

To know where each message's text landed, the template is rendered a second time with each
such message wrapped in markers that no text contains; with the markers removed, that
rendering must equal the first, or the template changed the message in a way that hides
where it went, and the chat is refused rather than tokenized unsafely.
"""

from __future__ import annotations

import re
import secrets

from diptych.errors import ChatTemplateError


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
             special_in_content: bool = False, **extra) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (no BOS added: the
    template writes its own). `special_in_content=True` lets message text spell control
    tokens (for trusted messages only)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         **extra)
    suspect = [] if special_in_content else [
        i for i, m in enumerate(messages)
        if isinstance(m.get("content"), str) and tokenizer.has_special(m["content"])]
    if not suspect:
        return tokenizer.encode(text, add_bos=False, parse_special=True)
    nonce = secrets.token_hex(8)
    start, end = f"\ue000{nonce}\ue001", f"\ue001{nonce}\ue000"
    marked = [dict(m, content=_wrap(m["content"], start, end)) if i in suspect else m
              for i, m in enumerate(messages)]
    wrapped = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt,
                                            **extra)
    return tokenizer.encode_template(text, _spans(text, wrapped, start, end))


def _wrap(content: str, start: str, end: str) -> str:
    # inside the surrounding whitespace, so a template that trims the message trims the same
    core = content.strip()
    lead = content[:len(content) - len(content.lstrip())]
    return lead + start + core + end + content[len(lead) + len(core):]


def _spans(text: str, wrapped: str, start: str, end: str) -> list[tuple[int, int]]:
    """Character ranges of `text` that were message text in `wrapped`."""
    spans, plain, pos, inside = [], [], 0, None
    for m in re.finditer(f"{re.escape(start)}|{re.escape(end)}", wrapped):
        plain.append(wrapped[pos:m.start()])
        at = sum(map(len, plain))
        opening = m.group() == start
        if opening == (inside is not None):   # nested or unpaired markers
            _refuse()
        if opening:
            inside = at
        else:
            spans.append((inside, at))
            inside = None
        pos = m.end()
    plain.append(wrapped[pos:])
    if inside is not None or "".join(plain) != text:
        _refuse()
    return spans


def _refuse():
    raise ChatTemplateError(
        "a message spells a special token (such as <|im_start|>) and this chat template "
        "rewrites message text, so the token cannot be kept as plain text; remove it from the "
        "message, or pass special_in_content=True if the messages are trusted")
