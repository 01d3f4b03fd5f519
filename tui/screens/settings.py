"""The chat's settings: system prompt and sampling; the backend, where there is a choice."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, TextArea

from diptych.errors import DiptychError

from diptych.tui.chat_settings import ChatSettings


@dataclass
class SettingsResult:
    settings: ChatSettings
    backend: str


# (field, label, type): one row per sampling setting of ChatSettings
FIELDS = [
    ("temperature", "Temperature (0 = greedy)", float),
    ("top_p", "Top-p", float),
    ("top_k", "Top-k (0 = off)", int),
    ("min_p", "Min-p", float),
    ("repetition_penalty", "Repetition penalty", float),
    ("max_tokens", "Max tokens per reply", int),
    ("seed", "Seed", int),
]


class SettingsScreen(ModalScreen[SettingsResult | None]):
    AUTO_FOCUS = "#system"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save"),
                Binding("enter", "save", "Save")]  # in a field; Ctrl+S saves from anywhere

    def __init__(self, settings: ChatSettings, backend: str, backends: list[str], model=None):
        """`model`: the loaded Model, whose defaults an empty field stands for."""
        super().__init__(classes="dialog")
        self.settings, self.backend, self.backends = settings, backend, backends
        self.defaults = model.sampling if model is not None else None

    def compose(self):
        with VerticalScroll(classes="dialog-body wide", id="settings-form"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.settings.system, id="system", compact=True)
            for name, label, _ in FIELDS:
                value = getattr(self.settings, name)
                with Horizontal(classes="field"):
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=name, compact=True,
                                placeholder=self._default_text(name))
            with Horizontal(classes="field"):
                yield Label("Backend")
                if len(self.backends) > 1:
                    yield Select([(b, b) for b in self.backends], value=self.backend,
                                 allow_blank=False, compact=True, id="backend")
                else:
                    yield Label(self.backend, id="backend-name")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_input_submitted(self) -> None:
        self.action_save()

    def _default_text(self, name: str) -> str:
        """What an empty field means: the model's value, which is in effect."""
        if name == "seed":
            return "random"
        if self.defaults is None or name == "max_tokens":
            return "model default"
        return f"{getattr(self.defaults, name):g} (model default)"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def action_save(self) -> None:
        values = {"system": self.query_one("#system", TextArea).text}
        try:
            for name, label, kind in FIELDS:
                raw = self.query_one(f"#{name}", Input).value.strip()
                if not raw and name != "max_tokens":
                    values[name] = None
                    continue
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise DiptychError(f"{label}: {raw!r} is not a number") from None
            settings = ChatSettings(**values)
            settings.validate()
        except DiptychError as exc:
            self.notify(str(exc), title="Invalid setting", severity="error")
            return
        backend = (self.query_one("#backend", Select).value if len(self.backends) > 1
                   else self.backend)
        self.dismiss(SettingsResult(settings, backend))
