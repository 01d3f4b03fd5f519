"""The Textual app: owns the database and the loaded model; the chat screen does the rest."""

from __future__ import annotations

import time
from pathlib import Path

from textual import work
from textual.worker import get_current_worker
from textual.app import App, InvalidThemeError, SystemCommand
from textual.binding import Binding

from diptych.backends import resolve
from diptych.inference.speculative import DEFAULT_DRAFT_MAX

from .chat_settings import ChatSettings
from .models import read_settings
from .paths import database_path
from .screens.chat import ChatScreen
from .screens.chat_picker import ChatPicker
from .screens.finetune import FinetuneScreen
from .store_recovery import open_store
from .training_data import export_chats, export_path

QUIT_WINDOW_S = 1.5  # a second Ctrl+C within this many seconds quits
THEMES = ("textual-dark", "textual-light")


class DiptychApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "diptych"
    BINDINGS = [Binding("ctrl+c", "quit_twice", "Quit", show=False)]

    def __init__(self, source: str | Path | None = None, *, model=None, backend: str = "auto",
                 n_ctx: int | None = None, settings: ChatSettings | None = None,
                 autoload: bool = True, adapter: str | Path | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX):
        """`source`: a .gguf path, or None for the embedded default. `model`: an already
        loaded Model to use instead (loading is then skipped). `autoload=False` starts
        with no model. `adapter`: a LoRA adapter to load with the model; `draft_max`: the
        most tokens a speculative pass may draft (what the caches are sized to roll back).
        A chat's draft model (`ChatSettings.draft`) loads with its first speculative reply."""
        super().__init__()
        self.model = model
        self.model_source = source if model is None else model.path
        self.adapter = adapter if model is None else model.adapter
        self.draft_max = draft_max
        self.backend_name = model.backend.name if model is not None else resolve(backend)
        self.n_ctx = model.n_ctx if model is not None and n_ctx is None else n_ctx
        self.default_settings = settings or ChatSettings()
        # a broken store or settings file never stops the app: it says what it did instead
        self.store, self.startup_notices = open_store(database_path())
        if problem := read_settings()[1]:
            self.startup_notices.append(problem)
        self.autoload = autoload and model is None
        self.chat = ChatScreen()
        self.finetune_screen = FinetuneScreen()  # installed: a run goes on behind the chat
        self._last_ctrl_c = 0.0

    def get_default_screen(self) -> ChatScreen:
        return self.chat

    def on_mount(self) -> None:
        self.install_screen(self.finetune_screen, "finetune")
        theme = self.store.preference("theme", THEMES[0])
        try:
            self.theme = theme
        except InvalidThemeError:
            self.startup_notices.append(f"The saved theme {theme!r} is unknown; it is ignored")
        for notice in self.startup_notices:
            self.notify(notice, title="Chat data", severity="warning", timeout=30)

    def chat_screen_ready(self) -> None:
        """Called once the chat screen is mounted: start loading the model."""
        if self.autoload:
            self.load_model(self.model_source, self.backend_name, self.adapter)
        elif self.model is not None:
            self.model.backend.on_first_use(self.chat.status.first_use_listener)

    def on_unmount(self) -> None:
        self.chat.quit_reply()
        self.finetune_screen.stop()
        if self.model is not None:
            self.model.backend.on_first_use(None)
        self.store.close()

    # -- model loading -------------------------------------------------------------------------
    def load_model(self, source: str | Path | None, backend: str,
                   adapter: str | Path | None = None) -> None:
        """Load `source` with `adapter`; when `source` is the model already loaded on
        `backend`, only its adapter changes (the weights are not read again)."""
        model = self.model
        if (model is not None and source is not None and backend == self.backend_name
                and Path(source) == Path(self.model_source or "")):
            self._swap_adapter(model, adapter)
            return
        name = Path(source).name if source is not None else "the default model"
        self.chat.status.loading(name)
        self._load(source, backend, name, adapter)

    @work(thread=True, exclusive=True, group="load")
    def _swap_adapter(self, model, adapter) -> None:
        try:
            model.set_adapter(adapter)
        except Exception as exc:  # a DiptychError: an unreadable or mismatched adapter
            self.call_from_thread(self._load_failed, f"the adapter {Path(adapter).name}", exc)
            return
        self.call_from_thread(self._loaded, self.model_source, self.backend_name, model)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, source, backend: str, name: str, adapter=None) -> None:
        from diptych import load
        from diptych.sources.default_model import default_model_path

        def progress(done: int, total: int, phase: str | None = None) -> None:
            self.call_from_thread(self.chat.status.loading, name, done, total, phase)

        try:
            # the default model's first-run download reports to the status bar, not stderr
            path = source if source is not None else default_model_path(
                lambda done, total: progress(done, total, "downloading"))
            model = load(path, backend=backend, n_ctx=self.n_ctx, progress=progress,
                         adapter=adapter, draft_max=self.draft_max)
        except Exception as exc:  # a DiptychError, or a file that breaks the reader
            self.call_from_thread(self._load_failed, name, exc)
            return
        if not get_current_worker().is_cancelled:  # a later pick replaces this one
            self.call_from_thread(self._loaded, source, backend, model)

    def _loaded(self, source, backend: str, model) -> None:
        self.model, self.model_source, self.backend_name = model, source, backend
        self.adapter = model.adapter
        model.backend.on_first_use(self.chat.status.first_use_listener)
        self.chat.refresh_status()
        with_adapter = f" with the adapter {Path(model.adapter).name}" if model.adapter else ""
        self.notify(f"Loaded {model.name}{with_adapter}")

    def _load_failed(self, name: str, exc: Exception) -> None:
        self.chat.refresh_status()
        self.notify(f"{type(exc).__name__}: {exc}", title=f"Could not load {name}",
                    severity="error", timeout=15)

    # -- app-wide actions ----------------------------------------------------------------------
    def action_quit_twice(self) -> None:
        now = time.monotonic()
        if now - self._last_ctrl_c < QUIT_WINDOW_S:
            self.exit()
            return
        self._last_ctrl_c = now
        self.notify("Press Ctrl+C again to quit", timeout=QUIT_WINDOW_S)

    def action_finetune(self) -> None:
        if self.screen is not self.finetune_screen:
            self.push_screen(self.finetune_screen)

    def action_finetune_chats(self) -> None:
        """Export the chats the user ticks as training data, and start a run on them."""
        chats = self.store.chats()
        if not chats:
            self.notify("There are no saved chats yet", severity="warning")
            return

        async def picked(ids: list[int] | None) -> None:
            if not ids:
                return
            path = export_path()
            try:
                written, skipped = export_chats(self.store, ids, path)
            except OSError as exc:
                self.notify(str(exc), title="Export failed", severity="error")
                return
            if skipped:
                self.notify(f"{skipped} of the chats have no reply to learn from; left out",
                            severity="warning")
            if written:
                self.notify(f"{written} chats written to {path}")
                await self.push_screen(self.finetune_screen)
                self.finetune_screen.start_on(path)

        self.push_screen(ChatPicker(chats), picked)

    def action_toggle_theme(self) -> None:
        self.theme = THEMES[1] if self.theme == THEMES[0] else THEMES[0]

    def watch_theme(self, theme: str) -> None:
        self.store.set_preference("theme", theme)

    def get_system_commands(self, screen):
        chat = self.chat
        yield SystemCommand("New chat", "Start a new conversation", chat.action_new_chat)
        yield SystemCommand("Load model", "Pick a GGUF model or type a path", chat.action_pick_model)
        yield SystemCommand("Chat settings", "System prompt, sampling, speculative decoding, "
                            "backend", chat.action_settings)
        yield SystemCommand("Regenerate reply", "Generate the last reply again",
                            chat.action_regenerate)
        yield SystemCommand("Edit last message", "Edit and resend your last message",
                            chat.action_edit_last)
        yield SystemCommand("Continue reply", "Continue a reply cut at the token limit",
                            chat.action_continue_reply)
        yield SystemCommand("Stop generation", "Keep what was generated so far", chat.action_stop)
        yield SystemCommand("Copy last reply", "Copy the last reply to the clipboard",
                            chat.action_copy_reply)
        yield SystemCommand("Copy code block", "Copy the last code block", chat.action_copy_code)
        yield SystemCommand("Rename chat", "Give this chat a new title", chat.action_rename_chat)
        yield SystemCommand("Delete chat", "Delete this chat and its messages",
                            chat.action_delete_chat)
        yield SystemCommand("Export chat", "Save this chat as a Markdown file",
                            chat.action_export_chat)
        yield SystemCommand("Fine-tune", "Train a LoRA adapter for this model on a data file",
                            self.action_finetune)
        yield SystemCommand("Fine-tune from saved chats", "Train on chats you tick "
                            "(exported as JSONL)", self.action_finetune_chats)
        yield SystemCommand("Toggle light/dark theme", "Switch between light and dark",
                            self.action_toggle_theme)
        yield from super().get_system_commands(screen)
