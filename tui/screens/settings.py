"""The chat's settings: system prompt, sampling, speculative decoding (prompt lookup, or a
draft model chosen in the model picker); the backend, where there is a choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, TextArea

from diptych.errors import DiptychError
from diptych.inference.speculative import DEFAULT_LOOKUP_NGRAM

from diptych.tui.chat_settings import ChatSettings
from diptych.tui.draft import DEFAULT

from .model_picker import ModelPicker, Picked


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
DRAFT_FIELDS = [("draft_max", "Most tokens drafted per pass", int),  # below the mode's rows
                ("lookup_ngram", "Prompt lookup n-gram", int)]
SPECULATIVE = [("off", "off"), ("prompt lookup", "lookup"), ("draft model", "draft")]


class SettingsScreen(ModalScreen[SettingsResult | None]):
    AUTO_FOCUS = "#system"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save"),
                Binding("enter", "save", "Save")]  # in a field; Ctrl+S saves from anywhere

    def __init__(self, settings: ChatSettings, backend: str, backends: list[str], model=None):
        """`model`: the loaded Model, whose defaults an empty field stands for."""
        super().__init__(classes="dialog")
        self.settings, self.backend, self.backends = settings, backend, backends
        self.defaults = model.sampling if model is not None else None
        self.rollback = model.engine.max_rollback if model is not None else None
        self.draft = settings.draft

    def compose(self):
        with VerticalScroll(classes="dialog-body wide", id="settings-form"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.settings.system, id="system", compact=True)
            yield from self._fields(FIELDS)
            with Horizontal(classes="field"):
                yield Label("Speculative decoding")
                yield Select(SPECULATIVE, value=self.settings.speculative or "off",
                             allow_blank=False, compact=True, id="speculative")
            with Horizontal(classes="field"):
                yield Label("Draft model")
                yield Button(self._draft_label(), id="draft", compact=True)
            yield from self._fields(DRAFT_FIELDS)
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

    def _fields(self, fields):
        for name, label, _ in fields:
            value = getattr(self.settings, name)
            with Horizontal(classes="field"):
                yield Label(label)
                yield Input("" if value is None else str(value), id=name, compact=True,
                            placeholder=self._default_text(name))

    def on_input_submitted(self) -> None:
        self.action_save()

    def _default_text(self, name: str) -> str:
        """What an empty field means: the model's value, which is in effect."""
        if name == "seed":
            return "random"
        if name == "draft_max":
            return "as many as the model allows" if self.rollback is None else \
                f"{self.rollback} (the most the model allows)"
        if name == "lookup_ngram":
            return f"{DEFAULT_LOOKUP_NGRAM} tokens, then fewer"
        if self.defaults is None or name == "max_tokens":
            return "model default"
        return f"{getattr(self.defaults, name):g} (model default)"

    def _draft_label(self) -> str:
        if not self.draft:
            return "choose…"
        return "the default model" if self.draft == DEFAULT else Path(self.draft).name

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "draft":
            self.app.push_screen(ModelPicker("Choose a draft model (same tokenizer as the "
                                             "chat's model)", adapters=False), self._drafted)
        else:
            self.dismiss(None)

    def _drafted(self, choice: Picked | None) -> None:
        if choice is None:
            return
        self.draft = str(choice.source)
        self.query_one("#draft", Button).label = self._draft_label()
        self.query_one("#speculative", Select).value = "draft"

    def action_save(self) -> None:
        values = {"system": self.query_one("#system", TextArea).text}
        try:
            for name, label, kind in FIELDS + DRAFT_FIELDS:
                raw = self.query_one(f"#{name}", Input).value.strip()
                if not raw and name != "max_tokens":
                    values[name] = None
                    continue
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise DiptychError(f"{label}: {raw!r} is not a number") from None
            mode = self.query_one("#speculative", Select).value
            values["speculative"] = None if mode == "off" else mode
            values["draft"] = self.draft
            settings = ChatSettings(**values)
            settings.validate()
            if self.rollback is not None and (settings.draft_max or 0) > self.rollback:
                raise DiptychError(f"at most {self.rollback} tokens can be drafted per pass: "
                                   "the model's caches roll back that far (diptych chat "
                                   "--draft-max N sizes them)")
        except DiptychError as exc:
            self.notify(str(exc), title="Invalid setting", severity="error")
            return
        backend = (self.query_one("#backend", Select).value if len(self.backends) > 1
                   else self.backend)
        self.dismiss(SettingsResult(settings, backend))
