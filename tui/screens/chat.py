"""The main screen: saved chats on the left, the transcript and the prompt on the right.

Replies are generated in a thread worker, one token at a time; the worker hands text to
the UI loop without waiting for it (see `ReplyText`) and checks for cancellation between
tokens, so Escape stops a reply at once and keeps what was generated. The model itself
rewinds its KV cache to the longest common token-id prefix of each new prompt, so
regenerate and edit-and-resend only have to pass the right messages.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, OptionList
from textual.worker import Worker, get_current_worker

from diptych.backends import available
from diptych.errors import DiptychError

from diptych.tui.chat_settings import ChatSettings
from diptych.tui.context_window import fit_messages
from diptych.tui.draft import DEFAULT, attach_draft
from diptych.tui.export import chat_to_markdown, code_blocks, export_filename
from diptych.tui.store import Chat
from diptych.tui.widgets.message import MessageView
from diptych.tui.widgets.prompt import PromptArea
from diptych.tui.widgets.sidebar import ChatList
from diptych.tui.widgets.status import StatusBar
from diptych.tui.widgets.transcript import PAGE, Transcript
from .dialogs import Confirm, TextPrompt
from .model_picker import ModelPicker, Picked
from .settings import SettingsResult, SettingsScreen

SAVE_EVERY_S = 0.5  # how often a streaming reply is written to the database
QUIT_WAIT_S = 10.0  # the longest a quit waits for the generation thread to stop
TITLE_LENGTH = 40


class ReplyText(Message):
    """Posted by the generation worker when new text waits in `view.pending`. The worker
    never waits for the UI, so drawing speed does not slow generation down; while the UI
    draws, pieces gather and are drawn together."""

    def __init__(self, view: MessageView):
        super().__init__()
        self.view = view


def context_left(view: MessageView) -> bool:
    """Whether the model's context has room for more of `view`'s reply."""
    return len(view.prompt_ids) + len(view.token_ids) < view.n_ctx


def finish_note(view: MessageView, finish: str | None) -> str | None:
    """The note under a reply that did not end on its own."""
    if finish == "length":
        return ("length: cut at the token limit (Ctrl+F continues)" if context_left(view)
                else "length: the context is full")
    return "stopped" if finish == "stopped" else None


class ChatScreen(Screen):
    AUTO_FOCUS = "PromptArea"
    # below 100 columns the chat list narrows (app.tcss), leaving the transcript room
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+l", "edit_last", "Edit last"),
        Binding("ctrl+f", "continue_reply", "Continue"),
        Binding("ctrl+g", "copy_reply", "Copy reply"),
        Binding("ctrl+b", "copy_code", "Copy code"),
        Binding("f2", "rename_chat", "Rename", show=False),
        Binding("f3", "find_chat", "Chats"),
        Binding("f4", "app.finetune", "Fine-tune"),
        Binding("ctrl+t", "app.toggle_theme", "Theme", show=False),
    ]

    def __init__(self):
        super().__init__()
        self.chat: Chat | None = None
        self.settings = ChatSettings()
        self.worker: Worker | None = None
        # True from a reply's start until its thread has left the model: a cancelled worker
        # reports itself finished at once, while its thread may still be inside a token
        self.generating = False
        self.model_free = threading.Event()  # cleared while a generation thread uses the model
        self.model_free.set()
        self.reply_view: MessageView | None = None
        self.last_timings = None

    def compose(self):
        yield Header(show_clock=False, icon="◧")
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Button("+ New chat", id="new-chat")
                yield Input(placeholder="search chats (F3)", id="chat-filter", compact=True)
                yield ChatList(id="chats")
            with Vertical(id="chat-pane"):
                yield Transcript(id="transcript")
                with Horizontal(id="input-row"):
                    yield PromptArea(id="prompt", placeholder="Message (Enter sends, Ctrl+J newline)")
                    yield Button("Stop", id="stop", variant="error")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.settings = self.app.default_settings
        self.query_one("#stop").display = False
        self.refresh_chat_list()
        self.refresh_status()
        self.app.chat_screen_ready()

    # -- accessors -----------------------------------------------------------------------------
    @property
    def store(self):
        return self.app.store

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one(PromptArea)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    def refresh_chat_list(self) -> None:
        self.query_one(ChatList).show(self.store.chats(), self.chat.id if self.chat else None,
                                      self.query_one("#chat-filter", Input).value)
        self.sub_title = self.chat.title if self.chat else "new chat"

    def refresh_status(self, note: str = "") -> None:
        self.status.show(self.app.model, self.last_timings, note)

    # -- chats ---------------------------------------------------------------------------------
    async def open_chat(self, chat_id: int | None) -> None:
        self.stop()
        self.chat = self.store.chat(chat_id) if chat_id is not None else None
        self.settings = self.chat.settings if self.chat else self.app.default_settings
        messages = self.store.messages(chat_id, limit=PAGE) if self.chat else []
        older = self.store.count_messages(chat_id, messages[0].id) if messages else 0
        await self.transcript.show(messages, older)
        self.refresh_chat_list()
        self.sync_cache()
        self.prompt.focus()

    @on(OptionList.OptionSelected, "#chats")
    async def chat_selected(self, event: OptionList.OptionSelected) -> None:
        await self.open_chat(int(event.option.id))

    def action_find_chat(self) -> None:
        self.query_one("#chat-filter", Input).focus()

    @on(Input.Changed, "#chat-filter")
    def filter_chats(self) -> None:
        self.refresh_chat_list()

    @on(Input.Submitted, "#chat-filter")
    def pick_from_filtered(self) -> None:
        chats = self.query_one(ChatList)
        chats.focus()
        if chats.option_count:
            chats.highlighted = chats.highlighted or 0

    @on(Button.Pressed, "#new-chat")
    async def action_new_chat(self) -> None:
        await self.open_chat(None)

    @on(Button.Pressed, "#load-older")
    @on(Transcript.ReachedTop)
    async def load_older(self) -> None:
        if self.chat is None or not self.transcript.older:
            return
        first = self.transcript.first_id()
        messages = self.store.messages(self.chat.id, before_id=first, limit=PAGE)
        older = self.store.count_messages(self.chat.id, messages[0].id) if messages else 0
        await self.transcript.prepend(messages, older)

    def action_rename_chat(self) -> None:
        if self.chat is None:
            return

        def renamed(title: str | None) -> None:
            if title:
                self.store.rename_chat(self.chat.id, title)
                self.chat.title = title
                self.refresh_chat_list()

        self.app.push_screen(TextPrompt("Rename chat", self.chat.title), renamed)

    def action_delete_chat(self) -> None:
        if self.chat is None:
            return
        chat = self.chat

        async def confirmed(yes: bool | None) -> None:
            if yes:
                self.store.delete_chat(chat.id)
                await self.open_chat(None)
                self.notify(f"Deleted “{chat.title}”")

        self.app.push_screen(Confirm(f"Delete “{chat.title}” and its messages?"), confirmed)

    def action_export_chat(self) -> None:
        if self.chat is None:
            return
        chat = self.chat

        def chosen(path: str | None) -> None:
            if not path:
                return
            target = Path(path).expanduser()
            try:
                target.write_text(chat_to_markdown(chat, self.store.messages(chat.id)))
            except OSError as exc:
                self.notify(str(exc), title="Export failed", severity="error")
                return
            self.notify(f"Exported to {target}")

        self.app.push_screen(
            TextPrompt("Export chat to Markdown file", str(Path.cwd() / export_filename(chat))),
            chosen)

    # -- settings and models -------------------------------------------------------------------
    def action_settings(self) -> None:
        def saved(result: SettingsResult | None) -> None:
            if result is None:
                return
            self.settings = result.settings
            if self.chat:
                self.store.set_chat_settings(self.chat.id, result.settings)
            else:
                self.app.default_settings = result.settings
            if result.backend != self.app.backend_name:
                self.app.backend_name = result.backend
                if self.app.model is not None:
                    self.stop()
                    self.app.load_model(self.app.model_source, result.backend)

        self.app.push_screen(SettingsScreen(self.settings, self.app.backend_name, available(),
                                            self.app.model), saved)

    def action_pick_model(self) -> None:
        def picked(choice: Picked | None) -> None:
            if choice is not None:
                self.stop()
                self.app.load_model(None if choice.source == DEFAULT else choice.source,
                                    self.app.backend_name, choice.adapter)

        self.app.push_screen(ModelPicker(adapter=self.app.adapter), picked)

    # -- sending and generating ----------------------------------------------------------------
    def ready(self) -> bool:
        if self.app.model is None:
            self.notify("No model is loaded: press Ctrl+O to pick one", severity="warning")
            return False
        if self.generating:
            self.notify("A reply is being generated: Escape stops it", severity="warning")
            return False
        return True

    @on(PromptArea.Submitted)
    async def send(self, event: PromptArea.Submitted) -> None:
        if not self.ready():
            return
        text = event.text.strip()
        if self.chat is None:
            title = text.splitlines()[0][:TITLE_LENGTH]
            self.chat = self.store.new_chat(title, self.settings, self.app.model.path.name)
            self.refresh_chat_list()
        self.prompt.clear()
        message = self.store.add_message(self.chat.id, "user", text)
        await self.transcript.add("user", text, message.id)
        await self.reply()

    async def reply(self) -> None:
        """Generate the assistant's reply to the chat as stored."""
        model = self.app.model
        if self.chat.model != model.path.name:
            self.store.set_chat_model(self.chat.id, model.path.name)
            self.chat.model = model.path.name
        history = [{"role": m.role, "content": m.content} for m in self.store.messages(self.chat.id)]
        row = self.store.add_message(self.chat.id, "assistant", "")
        view = await self.transcript.add("assistant", "", row.id)
        self._start(view, self.settings.messages(history))

    async def action_continue_reply(self) -> None:
        """Continue the last reply where the token limit cut it. The model's cache still
        holds that reply, so only the new tokens are fed."""
        if self.chat is None or not self.ready():
            return
        views = self.transcript.messages
        view = views[-1] if views else None
        if (view is None or view.finish != "length" or view.generated_by is None
                or view.generated_by() is not self.app.model):
            self.notify("Only a reply cut at the token limit in this session can be continued",
                        severity="warning")
            return
        if not context_left(view):
            self.notify("The context is full: the reply cannot go on", severity="warning")
            return
        self._start(view, None)

    def _start(self, view: MessageView, messages: list[dict] | None) -> None:
        view.begin_stream()
        self.query_one("#stop").display = True
        self.generating = True
        self.model_free.clear()
        self.reply_view = view
        self.refresh_status("generating…")
        self.worker = self.generate(self.app.model, messages, self.settings.generation_kwargs(),
                                    view, self.settings.draft)

    @work(thread=True, exclusive=True, group="llm")
    def generate(self, model, messages: list[dict] | None, kwargs: dict,
                 view: MessageView, draft: str | None = None) -> None:
        """Reply to `messages`, or with None, continue `view`'s reply from its token ids.
        With kwargs' speculative="draft", `draft` (a path) drafts; it loads first if the
        model does not draft with it yet."""
        worker = get_current_worker()
        timings, error, stopped, finish = None, None, False, None
        pieces = None
        try:
            if kwargs["speculative"] == "draft":
                name = f"the draft {Path(draft).name}"
                if attach_draft(model, draft, lambda done, total: self.app.call_from_thread(
                        self.status.loading, name, done, total)):
                    self.app.call_from_thread(self.refresh_status, "generating…")
            if messages is not None:
                messages, dropped = fit_messages(model, messages, kwargs["max_tokens"])
                if dropped:
                    self.app.call_from_thread(
                        self.notify, f"The {dropped} oldest messages no longer fit in the "
                        f"context of {model.n_ctx} tokens and were left out of this reply's "
                        "prompt.")
                view.prompt_ids, view.token_ids = model.chat_prompt(messages), []
            # weakly: a reply on screen must not keep a replaced model in memory
            view.generated_by, view.n_ctx = weakref.ref(model), model.n_ctx
            pieces = model.stream(view.prompt_ids + view.token_ids, **kwargs)
            for piece in pieces:
                if worker.is_cancelled:
                    stopped = True
                    break
                timings = view.timings = piece.timings  # updated in place as tokens come
                finish = piece.finish_reason
                view.token_ids += piece.token_ids
                if view.pending.add(piece.text):
                    self.post_message(ReplyText(view))
        except Exception as exc:  # a DiptychError or a bug: shown, and the app keeps running
            error = exc
        finally:
            if pieces is not None:
                pieces.close()
            self.model_free.set()
        try:
            self.app.call_from_thread(self.finish_reply, view, timings, error,
                                      "stopped" if stopped else finish)
        except RuntimeError:  # the app has exited
            pass

    def _save(self, view: MessageView) -> str:
        """Move the text waiting in `view.pending` into the message and the database at
        once (no await in between, where a quit could slip in); returns it for drawing."""
        text = view.take_pending()
        self.store.update_message(view.message_id, view.content)
        return text

    async def on_reply_text(self, message: ReplyText) -> None:
        view = message.view
        text = view.take_pending()
        if not text:  # the reply finished first and drew it
            return
        now = time.monotonic()
        if now - view.saved_at > SAVE_EVERY_S:
            view.saved_at = now
            self.store.update_message(view.message_id, view.content)
            self.status.show(self.app.model, view.timings, "generating…")
        await view.draw(text)

    async def finish_reply(self, view: MessageView, timings, error, finish: str | None) -> None:
        """`finish`: "stopped" (Escape), "length" (max tokens or a full context), "stop"."""
        if view is not self.reply_view:  # the app quit first and saved the reply
            return
        self.generating, self.reply_view = False, None
        # saved first: on a quit, closing this screen cancels the worker, and this can run
        # before the app's unmount with the screen's widgets already gone
        text = self._save(view)
        view.finish = finish
        self.last_timings = timings or self.last_timings
        if not self.app.is_running:
            return
        self.query_one("#stop").display = False
        await view.draw(text)
        if error is not None and not view.content:
            self.store.delete_messages([view.message_id])
            await view.remove()
        elif view.is_attached:
            await view.end_stream(finish_note(view, finish))
        if error is not None:
            self.notify(f"{type(error).__name__}: {error}", title="Generation failed",
                        severity="error", timeout=10)
        self.refresh_status("stopped" if finish == "stopped" else "")
        self.refresh_chat_list()

    def quit_reply(self) -> None:
        """The app is quitting: stop the reply, wait for its thread to leave the model (one
        token at most), and save what has arrived."""
        self.stop()
        self.model_free.wait(timeout=QUIT_WAIT_S)
        if (view := self.reply_view) is not None:
            self.reply_view = None
            self._save(view)

    @on(Button.Pressed, "#stop")
    def action_stop(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.generating and self.worker is not None:
            self.worker.cancel()

    async def action_regenerate(self) -> None:
        if self.chat is None or not self.ready():
            return
        messages = self.store.messages(self.chat.id, limit=1)
        if not messages:
            return
        if messages[-1].role == "assistant":
            await self._forget([messages[-1].id])
        await self.reply()

    async def action_edit_last(self) -> None:
        """Take the last user message back into the prompt, dropping it and its reply."""
        if self.chat is None or not self.ready():
            return
        messages = self.store.messages(self.chat.id, limit=2)
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            return
        tail = messages[users[-1]:]
        await self._forget([m.id for m in tail])
        self.prompt.text = tail[0].content
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.sync_cache()

    def sync_cache(self) -> None:
        """Let the model's cache hold no more than the chat on screen (after an edit, or when
        another chat opens), so that the status bar's context count is this chat's. The next
        reply still reuses what is kept."""
        model = self.app.model
        if model is None or self.generating:  # a reply's end refreshes the status itself
            self.refresh_status()
            return
        history = [{"role": m.role, "content": m.content}
                   for m in self.store.messages(self.chat.id)] if self.chat else []
        try:
            ids = model.chat_prompt(self.settings.messages(history),
                                    add_generation_prompt=False) if history else []
        except DiptychError:  # a template that cannot end on the last turn: keep nothing
            ids = []
        model.engine.keep_prefix(ids)
        self.refresh_status()

    async def _forget(self, message_ids: list[int]) -> None:
        self.store.delete_messages(message_ids)
        for view in self.transcript.messages:
            if view.message_id in message_ids:
                await view.remove()

    def _last_reply(self) -> MessageView | None:
        replies = [v for v in self.transcript.messages if v.role == "assistant"]
        return replies[-1] if replies else None

    def action_copy_reply(self) -> None:
        if view := self._last_reply():
            view.action_copy()

    def action_copy_code(self) -> None:
        views = [v for v in self.transcript.messages if code_blocks(v.content)]
        if views:
            views[-1].action_copy_code()
        else:
            self.notify("No code block in this chat", severity="warning")
