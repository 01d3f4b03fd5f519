"""Pick a model: the default, GGUF files in configured folders and the HF cache, or a path."""

from __future__ import annotations

from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from ..models import ModelChoice, discover


class ModelPicker(ModalScreen[Path | str | None]):
    """Dismisses with a path, "default" for the embedded default, or None on Escape."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self):
        super().__init__(classes="dialog")
        self.choices: list[ModelChoice] = discover()

    def compose(self):
        with Vertical(classes="dialog-body wide"):
            yield Label("Load a model", classes="dialog-title")
            yield OptionList(*(Option(f"{c.label}  [dim]{c.source}[/]", id=str(i))
                               for i, c in enumerate(self.choices)), id="model-list")
            yield Input(placeholder="or type a path to a .gguf file and press Enter",
                        id="model-path")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        choice = self.choices[int(event.option.id)]
        self.dismiss(choice.path if choice.path is not None else "default")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(Path(event.value.strip()).expanduser())
