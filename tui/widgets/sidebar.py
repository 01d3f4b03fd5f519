"""The list of saved chats, newest first: one line each (title, cut with an ellipsis, and
how long ago it changed), filtered by what is typed in the search field above it."""

from __future__ import annotations

import time

from rich.table import Table
from textual.binding import Binding
from textual.widgets import OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist

from diptych.tui.store import Chat


def relative_age(seconds: float) -> str:
    """'now', '5m', '3h', '2d', '6w': how long ago, in the largest whole unit."""
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return "now"


def chat_line(chat: Chat, now: float) -> Table:
    line = Table.grid(expand=True)
    line.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    line.add_column(justify="right", style="dim", no_wrap=True)
    line.add_row(chat.title, " " + relative_age(now - chat.updated))
    return line


class ChatList(OptionList):
    BINDINGS = [
        Binding("r", "screen.rename_chat", "Rename"),
        Binding("d,delete", "screen.delete_chat", "Delete"),
        Binding("e", "screen.export_chat", "Export"),
    ]

    def show(self, chats: list[Chat], current: int | None, query: str = "") -> None:
        now = time.time()
        query = query.strip().lower()
        shown = [c for c in chats if query in c.title.lower()]
        self.titles = [c.title for c in shown]  # what each line says, in order
        self.clear_options()
        self.add_options(Option(chat_line(c, now), id=str(c.id)) for c in shown)
        if current is not None:
            try:
                self.highlighted = self.get_option_index(str(current))
            except OptionDoesNotExist:
                self.highlighted = None
