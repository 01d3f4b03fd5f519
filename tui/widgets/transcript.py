"""The scrolling transcript. Only the latest messages are mounted; older ones load on
demand, a page at a time, so that long chats open and scroll fast."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Button

from ..store import Message
from .message import MessageView

PAGE = 30


class Transcript(VerticalScroll):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.older = 0  # messages of this chat not mounted yet

    def compose(self):
        yield Button("", id="load-older", variant="default")

    def on_mount(self) -> None:
        self._update_older_button()

    @property
    def messages(self) -> list[MessageView]:
        return list(self.query(MessageView))

    async def show(self, messages: list[Message], older: int) -> None:
        await self.query(MessageView).remove()
        self.query(".welcome").remove()
        self.older = older
        self._update_older_button()
        await self.mount_all([MessageView(m.role, m.content, m.id) for m in messages])
        self.scroll_end(animate=False, immediate=True)
        self.anchor()

    async def prepend(self, messages: list[Message], older: int) -> None:
        self.older = older
        self._update_older_button()
        views = [MessageView(m.role, m.content, m.id) for m in messages]
        await self.mount_all(views, after=self.query_one("#load-older"))

    async def add(self, role: str, content: str, message_id: int) -> MessageView:
        view = MessageView(role, content, message_id)
        await self.mount(view)
        self.anchor()
        return view

    def first_id(self) -> int | None:
        views = self.messages
        return views[0].message_id if views else None

    def _update_older_button(self) -> None:
        button = self.query_one("#load-older", Button)
        button.label = f"Load {min(self.older, PAGE)} older messages ({self.older} in all)"
        button.display = self.older > 0
