"""The list of saved chats, newest first."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist

from diptych.tui.store import Chat


class ChatList(OptionList):
    BINDINGS = [
        Binding("r", "screen.rename_chat", "Rename"),
        Binding("d,delete", "screen.delete_chat", "Delete"),
        Binding("e", "screen.export_chat", "Export"),
    ]

    def show(self, chats: list[Chat], current: int | None) -> None:
        self.clear_options()
        self.add_options(Option(c.title, id=str(c.id)) for c in chats)
        if current is not None:
            try:
                self.highlighted = self.get_option_index(str(current))
            except OptionDoesNotExist:
                self.highlighted = None
