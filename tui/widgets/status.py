"""The status bar: backend and device, model and quant (and adapter), context, speed (and
speculative decoding's acceptance), the KV caches' memory (the model's and its draft's) and
the process's, leaving out the least useful of these on a narrow terminal; while a model
loads, what it is doing and a progress bar; while the backend compiles kernels on first use,
a message saying so."""

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
        self._facts: str | dict[str, str] = "no model loaded"

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
        target, draft = cache_bytes(model)
        self._update({
            "note": note,
            "backend": model.backend.describe(),
            "model": model.path.stem,
            "quant": quant_summary(model),
            "adapter": f"+ {Path(model.adapter).name}" if model.adapter else "",
            "context": f"context {model.engine.n_cached}/{model.n_ctx}",
            "speeds": speeds(timings) if timings is not None else "",
            "kv": f"KV {target / MIB:.0f} MiB"
                  + (f" + draft {draft / MIB:.0f} MiB" if draft else ""),
            "memory": f"{memory_in_use() / MIB:.0f} MiB",
        })

    def first_use_listener(self, what: str | None) -> None:
        """A `Backend.on_first_use` listener; it is called on the thread that does the
        work, so it only posts a message."""
        self.post_message(self.FirstUse(what))

    def on_status_bar_first_use(self, message: FirstUse) -> None:
        self.first_use = message.what or ""

    def watch_first_use(self) -> None:
        self._update(self._facts)

    def on_resize(self) -> None:
        self._update(self._facts)

    def _update(self, facts: str | dict[str, str]) -> None:
        """Show `facts`: a line, or the named parts `show` gives, fitted to the bar's width."""
        self._facts = facts
        first_use = f"{self.first_use} (first use only)… │ " if self.first_use else ""
        if isinstance(facts, dict):
            width = self.size.width or 1 << 16   # unknown before the first layout
            facts = fit(facts, width - len(first_use))
        self.query_one("#facts", Static).update(first_use + facts)


# What a narrow terminal's status bar leaves out first; the note and the context always show
DROPPED_FIRST = ("memory", "kv", "backend", "quant", "model", "speeds")


def fit(parts: dict[str, str], width: int) -> str:
    """The status bar's parts (named as in `StatusBar.show`) as one line, leaving out those
    least worth their room (DROPPED_FIRST) until it fits in `width` columns."""
    parts = {name: text for name, text in parts.items() if text}
    for name in (None,) + DROPPED_FIRST:
        parts.pop(name, None)
        # the model's name, its quant types and its adapter, as one part
        model = (" ".join(parts[k] for k in ("model", "quant", "adapter") if k in parts)
                 if "model" in parts else "")
        shown = [parts.get("note"), parts.get("backend"), model, parts.get("context"),
                 parts.get("speeds"), parts.get("kv"), parts.get("memory")]
        line = " │ ".join(p for p in shown if p)
        if len(line) <= width:
            break
    return line


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
