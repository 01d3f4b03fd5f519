"""The scrolling transcript. Only the latest messages are mounted; older ones load on
demand, a page at a time, so that long chats open and scroll fast."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.message import Message as UIMessage
from textual.widgets import Button

from diptych.tui.store import Message
from .message import MessageView

PAGE = 30


class Transcript(VerticalScroll):
    class ReachedTop(UIMessage):
        """The user scrolled to the top while older messages are not mounted."""

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

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self.older and new_value == 0 and old_value > 0:
            self.post_message(self.ReachedTop())

    async def prepend(self, messages: list[Message], older: int) -> None:
        """Mount older messages above the others, keeping the view where it was."""
        views = self.messages
        self.older = older
        self._update_older_button()
        await self.mount_all([MessageView(m.role, m.content, m.id) for m in messages],
                             after=self.query_one("#load-older"))
        if views:
            self.scroll_to_widget(views[0], top=True, animate=False, immediate=True)

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
