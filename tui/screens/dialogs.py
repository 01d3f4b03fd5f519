"""Small dialogs: ask for one line of text, or confirm an action."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label


class TextPrompt(ModalScreen[str | None]):
    """Dismisses with the entered text, or None on Escape."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = ""):
        super().__init__(classes="dialog")
        self.title_text, self.value, self.placeholder = title, value, placeholder

    def compose(self):
        with Vertical(classes="dialog-body"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, placeholder=self.placeholder)
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class Confirm(ModalScreen[bool]):
    AUTO_FOCUS = "#yes"  # Enter presses it
    BINDINGS = [Binding("escape,n", "dismiss(False)", "Cancel"),
                Binding("y", "dismiss(True)", "Yes"), Binding("enter", "dismiss(True)", "Yes")]

    def __init__(self, question: str):
        super().__init__(classes="dialog")
        self.question = question

    def compose(self):
        with Vertical(classes="dialog-body"):
            yield Label(self.question, classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", id="no")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
