"""Saved chats as fine-tuning data: one `{"messages": [...]}` line per chat, the format
`diptych.finetune` reads (loss on every assistant turn)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .paths import data_dir


def export_path() -> Path:
    """A new file for an export, in the data folder."""
    return data_dir() / "finetune-data" / f"chats-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def chat_record(store, chat) -> dict | None:
    """The chat as a training record: its system prompt, then its messages; None when no
    assistant message has text (nothing to learn from). Empty messages (a reply that
    failed) are left out."""
    history = [{"role": m.role, "content": m.content}
               for m in store.messages(chat.id) if m.content.strip()]
    if not any(m["role"] == "assistant" for m in history):
        return None
    return {"messages": chat.settings.messages(history)}


def export_chats(store, chat_ids: list[int], path: Path) -> tuple[int, int]:
    """Write the chats as JSONL to `path` (created with its folder); returns how many were
    written and how many were left out for having no reply."""
    records = [chat_record(store, store.chat(i)) for i in chat_ids]
    kept = [r for r in records if r is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                    encoding="utf-8")
    return len(kept), len(records) - len(kept)
