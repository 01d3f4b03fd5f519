"""The status bar: backend and device, model and quant, context, speed, memory."""

from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import ProgressBar, Static

from diptych.tui.model_facts import memory_in_use, quant_summary


class StatusBar(Horizontal):
    def compose(self):
        yield Static("no model loaded", id="facts")
        yield ProgressBar(id="load-progress", show_eta=False)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    @property
    def text(self) -> str:
        return str(self.query_one("#facts", Static).content)

    def loading(self, what: str, done: int = 0, total: int | None = None) -> None:
        self.query_one("#facts", Static).update(f"loading {what}…")
        bar = self.query_one(ProgressBar)
        bar.display = True
        bar.update(total=total, progress=done)

    def show(self, model, timings=None, note: str = "") -> None:
        self.query_one(ProgressBar).display = False
        if model is None:
            self.query_one("#facts", Static).update(note or "no model loaded  (Ctrl+O: pick one)")
            return
        parts = [
            model.backend.describe(),
            f"{model.path.stem} {quant_summary(model)}",
            f"context {model.engine.n_cached}/{model.n_ctx}",
        ]
        if timings is not None:
            parts.append(speeds(timings))
        parts.append(f"{memory_in_use() / (1 << 20):.0f} MiB")
        self.query_one("#facts", Static).update(" │ ".join(p for p in [note] + parts if p))


def speeds(timings) -> str:
    """'prompt N tok/s · decode M tok/s', leaving out what is not measured yet."""
    known = []
    if timings.prefill_s:
        known.append(f"prompt {timings.prefill_tps:.0f} tok/s")
    if timings.decode_tps:
        known.append(f"decode {timings.decode_tps:.1f} tok/s")
    return " · ".join(known)
