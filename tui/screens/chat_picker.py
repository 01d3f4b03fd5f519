"""Choose saved chats (to fine-tune on them): a list to tick, Enter to go on."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, SelectionList


class ChatPicker(ModalScreen[list[int] | None]):
    """Dismisses with the ids of the ticked chats, or None on Escape."""

    AUTO_FOCUS = "SelectionList"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("enter", "done", "Fine-tune on them", priority=True)]

    def __init__(self, chats: list, title: str = "Fine-tune on saved chats (Space ticks)"):
        super().__init__(classes="dialog")
        self.chats, self.title_text = chats, title

    def compose(self):
        with Vertical(classes="dialog-body wide"):
            yield Label(self.title_text, classes="dialog-title")
            yield SelectionList[int](*[(c.title, c.id) for c in self.chats], id="chat-choice")
        yield Footer()

    def action_done(self) -> None:
        picked = list(self.query_one(SelectionList).selected)
        if picked:
            self.dismiss(picked)
        else:
            self.notify("Tick the chats to learn from with Space", severity="warning")
