"""One chat message: who said it, and its text rendered as Markdown."""

from __future__ import annotations

import threading

from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from diptych.tui.export import code_blocks

CODE_SCROLL_STEP = 8  # columns a code block moves per ← or →


class PendingText:
    """Text a worker thread has generated and the UI has not drawn yet."""

    def __init__(self):
        self._lock = threading.Lock()
        self._text = ""
        self._posted = False

    def add(self, text: str) -> bool:
        """Append text; True when the UI must be told (it has not been since the last take)."""
        with self._lock:
            self._text += text
            tell, self._posted = not self._posted, True
            return tell

    def take(self) -> str:
        with self._lock:
            text, self._text, self._posted = self._text, "", False
            return text


class MessageView(Vertical, can_focus=True):
    """Focus a message (click it, or Tab to it) to copy it or its code blocks."""

    BINDINGS = [
        Binding("c", "copy", "Copy message"),
        Binding("b", "copy_code", "Copy code block"),
        Binding("left", "scroll_code(-1)", "Code ←", show=False),
        Binding("right", "scroll_code(1)", "Code →", show=False),
    ]

    def __init__(self, role: str, content: str, message_id: int | None = None):
        super().__init__(classes=role)
        self.role = role
        self.content = content
        self.message_id = message_id
        self._stream: MarkdownStream | None = None
        self._next_block = 0
        self.pending = PendingText()
        self.saved_at = 0.0  # monotonic time a streaming reply was last written to the store
        self.timings = None  # a streaming reply's Timings
        # a reply generated in this session: the prompt's token ids and its own, so that
        # "continue" feeds the model exactly what its cache holds (never re-tokenized text)
        self.prompt_ids: list[int] = []
        self.token_ids: list[int] = []
        self.generated_by = None  # a weak reference to the Model that generated it
        self.n_ctx = 0  # that model's context
        self.finish: str | None = None  # how its generation ended (see ChatScreen.finish_reply)

    def compose(self):
        yield Label("You" if self.role == "user" else "Assistant", classes="role")
        yield Markdown(self.content)

    @property
    def body(self) -> Markdown:
        return self.query_one(Markdown)

    def begin_stream(self) -> None:
        """Start (or, after a "length" note, resume) streaming text into the message."""
        self.query(".note").remove()
        self.add_class("streaming")
        self._stream = Markdown.get_stream(self.body)

    def take_pending(self) -> str:
        """Move the text the worker left in `pending` into `content`; returns it for `draw`.
        Synchronous, so that what is saved and what is shown never differ by an await."""
        text = self.pending.take()
        self.content += text
        return text

    async def draw(self, text: str) -> None:
        if text and self._stream is not None and self.is_attached:  # the chat may be closed
            await self._stream.write(text)

    async def end_stream(self, note: str | None = None) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("streaming")
        # one full update at the end: a stream can leave code fences unrendered
        await self.body.update(self.content)
        if note:
            await self.mount(Label(note, classes="note"))

    def action_scroll_code(self, direction: int) -> None:
        """Scroll the message's code blocks sideways (their long lines are not wrapped)."""
        for fence in self.query(MarkdownFence):
            fence.scroll_relative(x=direction * CODE_SCROLL_STEP, animate=False, immediate=True)

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.content)
        self.notify("Message copied")

    def action_copy_code(self) -> None:
        """Copies the code blocks one after another on repeated presses."""
        blocks = code_blocks(self.content)
        if not blocks:
            self.notify("This message has no code block", severity="warning")
            return
        i = self._next_block % len(blocks)
        self._next_block = i + 1
        self.app.copy_to_clipboard(blocks[i])
        self.notify(f"Code block {i + 1} of {len(blocks)} copied")
