"""The status bar: backend and device, model and quant (and adapter), context, speed (and
speculative decoding's acceptance), the KV caches' memory (the model's and its draft's) and
the process's; while a model loads, what it is doing and a progress bar; while the backend
compiles kernels on first use, a message saying so."""

from __future__ import annotations

from pathlib import Path

from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import ProgressBar, Static

from diptych.tui.draft import cache_bytes
from diptych.tui.model_facts import memory_in_use, quant_summary

MIB = 1 << 20


class StatusBar(Horizontal):
    first_use: reactive[str] = reactive("")  # first-use work under way (compiling...), if any

    class FirstUse(Message):
        def __init__(self, what: str | None):
            super().__init__()
            self.what = what

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._facts: str = "no model loaded"

    def compose(self):
        yield Static(self._facts, id="facts")
        yield ProgressBar(id="load-progress", show_eta=False)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    @property
    def text(self) -> str:
        return str(self.query_one("#facts", Static).content)

    def loading(self, what: str, done: int = 0, total: int | None = None,
                phase: str | None = None) -> None:
        """`done` of `total` bytes of `phase` are through; by default the phase is the
        weights' preparation (total None: not started yet)."""
        phase = phase or ("reading the file" if total is None else
                          "preparing the weights" if done < total else "setting up the cache")
        self._update(f"loading {what}: {phase}…")
        bar = self.query_one(ProgressBar)
        bar.display = True
        bar.update(total=total, progress=done)

    def show(self, model, timings=None, note: str = "") -> None:
        self.query_one(ProgressBar).display = False
        if model is None:
            self._update(note or "no model loaded  (Ctrl+O: pick one)")
            return
        adapter = f" + {Path(model.adapter).name}" if model.adapter else ""
        parts = [
            model.backend.describe(),
            f"{model.path.stem} {quant_summary(model)}{adapter}",
            f"context {model.engine.n_cached}/{model.n_ctx}",
        ]
        if timings is not None:
            parts.append(speeds(timings))
        target, draft = cache_bytes(model)
        parts.append(f"KV {target / MIB:.0f} MiB"
                     + (f" + draft {draft / MIB:.0f} MiB" if draft else ""))
        parts.append(f"{memory_in_use() / MIB:.0f} MiB")
        self._update(" │ ".join(p for p in [note] + parts if p))

    def first_use_listener(self, what: str | None) -> None:
        """A `Backend.on_first_use` listener; it is called on the thread that does the
        work, so it only posts a message."""
        self.post_message(self.FirstUse(what))

    def on_status_bar_first_use(self, message: FirstUse) -> None:
        self.first_use = message.what or ""

    def watch_first_use(self) -> None:
        self._update(self._facts)

    def _update(self, facts: str) -> None:
        self._facts = facts
        shown = f"{self.first_use} (first use only)… │ {facts}" if self.first_use else facts
        self.query_one("#facts", Static).update(shown)


def speeds(timings) -> str:
    """'prompt N tok/s · decode M tok/s', leaving out what is not measured yet."""
    known = []
    if timings.prefill_s:
        known.append(f"prompt {timings.prefill_tps:.0f} tok/s")
    if timings.decode_tps:
        known.append(f"decode {timings.decode_tps:.1f} tok/s")
    if timings.verify_passes:
        known.append(f"accepted {timings.acceptance_rate:.0%} · "
                     f"{timings.tokens_per_pass:.2f} tok/pass")
    return " · ".join(known)
