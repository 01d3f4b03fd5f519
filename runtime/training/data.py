"""Training data: JSONL files read into token ids and loss masks.

Each line of a file is one example, in one of three forms:

    {"text": "..."}                                  loss on every token
    {"prompt": "...", "completion": "..."}           loss on the completion only
    {"messages": [{"role": ..., "content": ...}]}    loss on every assistant turn

Text and completions end with the model's EOS token, so the model learns where to stop.
A chat is rendered with the model's own chat template (sandboxed) and the assistant turns are
found in that rendering: where the template marks them with `{% generation %}` blocks (as
transformers' `return_assistant_tokens_mask` reads them), those blocks; otherwise, for each
assistant message, the text the turn adds to the conversation before it (its header ends
the rendering of the earlier messages with a generation prompt; the turn ends where the
rendering up to it ends). Every assistant turn counts, not only the last. A token is in the
mask when any of its characters is. Messages in a data file are trusted: text that spells a
control token is that token.

A data path is a file (the training set) or a directory holding train.jsonl and optionally
valid.jsonl and test.jsonl. A malformed line is a `DatasetError` naming the file and line,
raised before any training starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from diptych.errors import DatasetError, DiptychError
from diptych.text.chat_template import render_chat_spans

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """Token ids and, per token, whether the loss learns to predict it."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]


def data_files(path: str | Path) -> dict[str, Path]:
    """The split files of a data path: a file is the training set; a directory holds
    train.jsonl (required), valid.jsonl and test.jsonl."""
    path = Path(path)
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise DatasetError(f"no data at {path}: give a .jsonl file or a directory with "
                           f"train.jsonl")
    found = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
    if "train" not in found:
        raise DatasetError(f"{path} has no train.jsonl")
    return found


def load_examples(path: str | Path, tokenizer) -> list[Example]:
    """Every example of a JSONL file, tokenized with its loss mask."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append(example(record, tokenizer))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        except DiptychError as e:
            raise DatasetError(f"{path}, line {n}: {e}") from None
    if not out:
        raise DatasetError(f"{path} holds no examples")
    return out


def example(record, tokenizer) -> Example:
    """One record ({"text"}, {"prompt", "completion"} or {"messages"}) as an Example."""
    if not isinstance(record, dict):
        raise DatasetError(f"a line must be a JSON object, not {type(record).__name__}")
    keys = set(record)
    if keys == {"text"}:
        ids = tokenizer.encode(_string(record, "text"), add_eos=True)
        return Example(tuple(ids), (True,) * len(ids))
    if keys == {"prompt", "completion"}:
        prompt = tokenizer.encode(_string(record, "prompt"))
        done = tokenizer.encode(_string(record, "completion"), add_bos=False, add_eos=True)
        return Example(tuple(prompt + done), (False,) * len(prompt) + (True,) * len(done))
    if keys == {"messages"}:
        return _chat(record["messages"], tokenizer)
    raise DatasetError(f"expected the keys text, prompt and completion, or messages; got "
                       f"{', '.join(sorted(map(str, keys))) or 'none'}")


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{key!r} must be a non-empty string")
    return value


def _chat(messages, tokenizer) -> Example:
    text, spans = chat_spans(tokenizer, messages)
    if not spans:
        raise DatasetError("the conversation has no assistant message to learn from")
    ids, offsets = tokenizer.encode_offsets(text)
    mask = tuple(any(s < b and a < e for a, b in spans) for s, e in offsets)
    return Example(tuple(ids), mask)


def chat_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    template = tokenizer.chat_template
    marked = render_chat_spans(template, messages, add_generation_prompt=False,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    if marked is not None:
        return marked
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DatasetError(
                f"the chat template does not render messages[{i}] as a continuation of the "
                f"turns before it, so its tokens cannot be found; use a template with "
                f"{{% generation %}} blocks")
        # the turn's trailing newline separates turns; the turn's text and end token count
        end = len(upto) - len(re.search(r"\s*$", upto).group())
        spans.append((len(before), end))
    return text, spans
