"""Pick a model: the default, GGUF files in configured folders and the HF cache, or a path."""

from __future__ import annotations

from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from diptych.tui.models import ModelChoice, add_configured_folder, discover


class ModelPicker(ModalScreen[Path | str | None]):
    """Dismisses with a path, "default" for the embedded default, or None on Escape."""

    AUTO_FOCUS = "#model-path"  # a path can be typed at once; Tab reaches the list
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("tab", "app.focus_next", "List / path")]

    def __init__(self):
        super().__init__(classes="dialog")
        self.choices: list[ModelChoice] = []

    def compose(self):
        with Vertical(classes="dialog-body wide"):
            yield Label("Load a model", classes="dialog-title")
            yield OptionList(id="model-list")
            yield Input(placeholder="or a path: a .gguf file, a Hugging Face model folder, "
                                    "a folder to search",
                        id="model-path")
        yield Footer()

    def on_mount(self) -> None:
        self._show_choices()

    def _show_choices(self) -> None:
        self.choices = discover()
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options(Option(c.label, id=str(i)) for i, c in enumerate(self.choices))
        options.highlighted = 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        choice = self.choices[int(event.option.id)]
        self.dismiss(choice.path if choice.path is not None else "default")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            return
        path = Path(event.value.strip()).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            # a folder of .gguf files (not a Hugging Face model folder): searched from now on
            add_configured_folder(path.resolve())
            event.input.clear()
            self._show_choices()
            self.query_one(OptionList).focus()
        else:
            self.dismiss(path)
