"""Pick a model: the default, GGUF files in configured folders and the HF cache, or a path;
and, for the chat's model, a LoRA adapter to use with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList, Select
from textual.widgets.option_list import Option

from diptych.tui.adapters import discover_adapters
from diptych.tui.models import ModelChoice, add_configured_folder, discover

NO_ADAPTER = ""


@dataclass(frozen=True)
class Picked:
    source: Path | str  # a path, or "default" for the embedded default
    adapter: str | None = None


class ModelPicker(ModalScreen[Picked | None]):
    """Dismisses with what was picked, or None on Escape. With `adapters`, it also offers
    the adapters the user has trained (and takes an adapter's path), `adapter` selected."""

    AUTO_FOCUS = "#model-path"  # a path can be typed at once; Tab reaches the list
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("tab", "next_field", "List / path")]
    # Tab goes round: the model's path, the model list, then the adapter's two fields
    ORDER = ("#model-path", "#model-list", "#adapter", "#adapter-path")

    def __init__(self, title: str = "Load a model", adapters: bool = True,
                 adapter: str | None = None):
        super().__init__(classes="dialog")
        self.choices: list[ModelChoice] = []
        self.title_text, self.adapters, self.adapter = title, adapters, adapter

    def compose(self):
        with Vertical(classes="dialog-body wide"):
            yield Label(self.title_text, classes="dialog-title")
            yield OptionList(id="model-list")
            yield Input(placeholder="or a path: a .gguf file, a Hugging Face model folder, "
                                    "a folder to search",
                        id="model-path")
            if self.adapters:
                found = [str(p) for p in discover_adapters()]
                if self.adapter and self.adapter not in found:
                    found.insert(0, self.adapter)
                with Horizontal(classes="field"):
                    yield Label("LoRA adapter")
                    yield Select([("none", NO_ADAPTER)] + [(Path(p).name, p) for p in found],
                                 value=self.adapter or NO_ADAPTER, allow_blank=False,
                                 compact=True, id="adapter")
                yield Input(placeholder="or an adapter's path: a PEFT folder or GGUF LoRA file",
                            id="adapter-path")
        yield Footer()

    def on_mount(self) -> None:
        self._show_choices()

    def action_next_field(self) -> None:
        order = [self.query_one(i) for i in self.ORDER if self.query(i)]
        at = order.index(self.focused) if self.focused in order else -1
        order[(at + 1) % len(order)].focus()

    def _show_choices(self) -> None:
        self.choices = discover()
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options(Option(c.label, id=str(i)) for i, c in enumerate(self.choices))
        options.highlighted = 0

    def _picked(self, source: Path | str) -> Picked:
        if not self.adapters:
            return Picked(source)
        typed = self.query_one("#adapter-path", Input).value.strip()
        chosen = typed or self.query_one("#adapter", Select).value
        return Picked(source, str(Path(chosen).expanduser()) if chosen else None)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        choice = self.choices[int(event.option.id)]
        self.dismiss(self._picked(choice.path if choice.path is not None else "default"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "adapter-path":  # the model is chosen next
            self.query_one(OptionList).focus()
            return
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
            self.dismiss(self._picked(path))
