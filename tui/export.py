"""A chat as a Markdown document, and the code blocks inside a reply."""

from __future__ import annotations

from markdown_it import MarkdownIt

from .store import Chat, Message


def chat_to_markdown(chat: Chat, messages: list[Message]) -> str:
    lines = [f"# {chat.title}", ""]
    if chat.model:
        lines += [f"Model: `{chat.model}`", ""]
    if chat.settings.system.strip():
        lines += ["## System", "", chat.settings.system.strip(), ""]
    for m in messages:
        lines += [f"## {'User' if m.role == 'user' else 'Assistant'}", "", m.content.strip(), ""]
    return "\n".join(lines)


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced and indented code blocks in `markdown`, in order."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [t.content for t in tokens if t.type in ("fence", "code_block")]


def export_filename(chat: Chat) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in chat.title.lower())
    return f"{'-'.join(filter(None, safe.split('-')))[:60] or 'chat'}-{chat.id}.md"
