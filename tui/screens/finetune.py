"""The fine-tune screen: train a LoRA adapter for the loaded model on a data file, with
live progress and loss plots; Stop saves a checkpoint that Resume continues; when a run is
done, the adapter can be put on the model at once.

The run trains on the model's file, loaded again by the training thread, so the chat keeps
its model (and can go on replying) while it trains; runs are written under the data folder
(`adapters/NAME`), where the model picker finds them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar, Sparkline, Static

from diptych.errors import DiptychError
from diptych.training.checkpoint import NAME as CHECKPOINT
from diptych.training.checkpoint import load as load_checkpoint
from diptych.training.options import TrainOptions

from diptych.tui.adapters import adapters_dir
from .dialogs import Confirm

# (option, label, type, default); "last_layers" becomes TrainOptions.layers
OPTIONS = [
    ("steps", "Steps", int, 100),
    ("rank", "Rank", int, 8),
    ("learning_rate", "Learning rate", float, 1e-4),
    ("batch_size", "Batch size", int, 4),
    ("last_layers", "Train the last N layers", int, None),
]
EVAL_POINTS = 20  # validation losses a run computes along the way (at most)


def run_name() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}"


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class FinetuneScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back to the chat"),
                Binding("f5", "start", "Start"), Binding("f6", "stop", "Stop"),
                Binding("f7", "start(True)", "Resume")]

    def __init__(self):
        super().__init__()
        self.training = False
        self.stop_event = threading.Event()
        self.losses: list[float] = []
        self.valid_losses: list[float] = []

    def compose(self):
        yield Header(show_clock=False, icon="◧")
        with VerticalScroll(id="finetune-form"):
            yield Label("", id="finetune-title", classes="dialog-title")
            for name, label, placeholder in (
                    ("data", "Training data", "a .jsonl file, or a folder with train.jsonl"),
                    ("valid", "Validation data", "optional: a .jsonl file (a data folder's "
                                                 "valid.jsonl is used)"),
                    ("run-name", "Run name", "the adapter's folder under the data folder")):
                with Horizontal(classes="field"):
                    yield Label(label)
                    yield Input(run_name() if name == "run-name" else "", id=name,
                                placeholder=placeholder, compact=True)
            for name, label, _, default in OPTIONS:
                with Horizontal(classes="field"):
                    yield Label(label)
                    yield Input("" if default is None else f"{default:g}", id=name,
                                compact=True, placeholder="all" if default is None else "")
            with Horizontal(classes="buttons"):
                yield Button("Start", variant="primary", id="start")
                yield Button("Stop", variant="error", id="stop-training", disabled=True)
                yield Button("Resume", id="resume")
            yield Static("Choose a data file and press Start.", id="train-status")
            yield ProgressBar(total=1, id="train-progress", show_eta=False)  # empty, not busy
            yield Label("Training loss", id="loss-title", classes="plot-title")
            yield Sparkline([], id="loss")
            yield Label("Validation loss", id="valid-title", classes="plot-title")
            yield Sparkline([], id="valid-loss")
        yield Footer()

    def on_screen_resume(self) -> None:
        model = self.app.model
        self.query_one("#finetune-title", Label).update(
            f"Fine-tune {model.name} (LoRA)" if model is not None else
            "Fine-tune: load a model first (Ctrl+O on the chat screen)")

    # -- starting ------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return adapters_dir() / self.query_one("#run-name", Input).value.strip()

    def _options(self, n_layers: int) -> dict:
        """The run's options from the fields; DiptychError for a value that cannot be."""
        values = {}
        for name, label, kind, _ in OPTIONS:
            raw = self.query_one(f"#{name}", Input).value.strip()
            if not raw:
                if name == "last_layers":
                    continue
                raise DiptychError(f"{label}: a value is needed")
            try:
                values[name] = kind(raw)
            except ValueError:
                raise DiptychError(f"{label}: {raw!r} is not a number") from None
        last = values.pop("last_layers", None)
        if last is not None:
            if not 1 <= last <= n_layers:
                raise DiptychError(f"the model has {n_layers} layers: train the last 1 to "
                                   f"{n_layers}, or leave it empty for all")
            values["layers"] = list(range(n_layers - last, n_layers))
        values["eval_every"] = max(1, values["steps"] // EVAL_POINTS)
        TrainOptions.from_mapping(values)  # every value checked before anything loads
        return values

    def action_start(self, resume: bool = False) -> None:
        self.start(resume)

    def action_stop(self) -> None:
        self.stop()

    def start(self, resume: bool = False) -> None:
        """Start a new run (or, with `resume`, continue the named one to Steps)."""
        model = self.app.model
        if model is None or self.training:
            self.notify("Load a model first" if model is None else "A run is training",
                        severity="warning")
            return
        data = self.query_one("#data", Input).value.strip()
        valid = self.query_one("#valid", Input).value.strip() or None
        try:
            if not data:
                raise DiptychError("Training data: give a .jsonl file or a folder")
            if not self.query_one("#run-name", Input).value.strip():
                raise DiptychError("Run name: give the adapter's folder a name")
            options = self._options(model.config.n_layers)
            saved = (self.out / CHECKPOINT).is_file()
            if resume and not saved:
                raise DiptychError(f"{self.out} holds no run to resume")
            if saved and not resume:
                raise DiptychError(f"{self.out} holds a run already: Resume continues it, "
                                   "or choose another name")
        except DiptychError as exc:
            self.notify(str(exc), title="Cannot start", severity="error")
            return
        history = load_checkpoint(self.out).history if resume else {"train": [], "valid": []}
        self._plot(history)
        if resume:  # a resumed run keeps the options it started with; it may train longer
            options = {k: options[k] for k in ("steps", "eval_every")}
        self.stop_event = threading.Event()
        self._set_training(True, f"loading {model.path.name} for training…")
        self.train(model.path, self.app.backend_name, Path(data).expanduser(),
                   None if valid is None else Path(valid).expanduser(), self.out, options,
                   resume)

    def start_on(self, data: Path) -> None:
        """A new run on `data` (a file of exported chats), under a new name."""
        self.query_one("#data", Input).value = str(data)
        self.query_one("#valid", Input).value = ""
        self.query_one("#run-name", Input).value = data.stem
        self.start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.start()
        elif event.button.id == "resume":
            self.start(resume=True)
        elif event.button.id == "stop-training":
            self.stop()

    def stop(self) -> None:
        if self.training:
            self.stop_event.set()
            self.query_one("#train-status", Static).update(
                "stopping after this step; a checkpoint is saved…")

    # -- the run -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="finetune")
    def train(self, model_path: Path, backend: str, data: Path, valid: Path | None, out: Path,
              options: dict, resume: bool) -> None:
        from diptych.training.finetune import finetune

        try:
            result = finetune(model_path, train=data, valid=valid,
                              out=None if resume else out, resume=out if resume else None,
                              backend=backend, stop=self.stop_event,
                              progress=lambda r: self.app.call_from_thread(self._report, r),
                              **options)
        except Exception as exc:  # a DiptychError (bad data, a full disk) or a bug: shown
            self.app.call_from_thread(self._failed, exc)
            return
        self.app.call_from_thread(self._finished, model_path, result)

    def _report(self, r) -> None:
        self.losses.append(r.loss)
        if r.valid_loss is not None:
            self.valid_losses.append(r.valid_loss)
        self._draw()
        self.query_one(ProgressBar).update(total=r.total, progress=r.step)
        valid = f" · validation {r.valid_loss:.4f}" if r.valid_loss is not None else ""
        stopping = " · stopping after this step" if self.stop_event.is_set() else ""
        self.query_one("#train-status", Static).update(
            f"step {r.step}/{r.total} · loss {r.loss:.4f}{valid} · "
            f"{r.tokens_per_second:.0f} tok/s · ETA {clock(r.eta_seconds)}{stopping}")

    def _failed(self, exc: Exception) -> None:
        self._set_training(False, f"failed: {exc}")
        self.notify(f"{type(exc).__name__}: {exc}", title="Fine-tuning failed",
                    severity="error", timeout=15)

    def _finished(self, model_path: Path, result) -> None:
        self._plot(result.history)
        self.query_one(ProgressBar).update(progress=result.steps)
        if result.interrupted:
            self._set_training(False, f"stopped after step {result.steps}: a checkpoint is "
                                      f"saved in {result.out}; Resume continues")
            return
        valid = (f", validation loss {result.valid_loss:.4f}" if result.valid_loss is not None
                 else "")
        self._set_training(False, f"done: {result.steps} steps, loss "
                                  f"{result.train_loss:.4f}{valid}; the adapter is in "
                                  f"{result.out}")
        model = self.app.model
        if model is not None and model.path == model_path:
            def use(yes: bool | None) -> None:
                if yes:
                    self.app.chat.stop()
                    self.app.load_model(self.app.model_source, self.app.backend_name,
                                        str(result.out))

            self.app.push_screen(Confirm(f"Use the adapter {result.out.name} on "
                                         f"{model.name} now?"), use)

    # -- drawing -------------------------------------------------------------------------------
    def _set_training(self, training: bool, status: str) -> None:
        self.training = training
        self.query_one("#start", Button).disabled = training
        self.query_one("#resume", Button).disabled = training
        self.query_one("#stop-training", Button).disabled = not training
        self.query_one("#train-status", Static).update(status)

    def _plot(self, history: dict) -> None:
        self.losses = list(history["train"])
        self.valid_losses = [loss for _, loss in history["valid"]]
        self._draw()

    def _draw(self) -> None:
        for name, title, losses in (("loss", "Training loss", self.losses),
                                    ("valid", "Validation loss", self.valid_losses)):
            span = f": {losses[0]:.4f} → {losses[-1]:.4f}" if losses else ""
            self.query_one(f"#{name}-title", Label).update(title + span)
        # copies: a reactive compares the new value with the old, which would be this list
        self.query_one("#loss", Sparkline).data = list(self.losses)
        self.query_one("#valid-loss", Sparkline).data = list(self.valid_losses)
