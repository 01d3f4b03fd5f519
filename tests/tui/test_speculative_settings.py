"""Speculative decoding and adapters in the chat app: the settings choose prompt lookup or a
draft model (from the model picker) and keep the choice per chat in the SQLite file; the
model picker offers the adapters under the data folder; and with the real default model,
choosing lookup makes the next reply speculative, its acceptance in the status bar while
it streams."""

import json
from dataclasses import replace

import pytest
from textual.widgets import Button, Select

import diptych.tui.screens.chat as chat_screen
from diptych.cli.chat import app_options
from diptych.cli.main import build_parser
from diptych.errors import DiptychError
from diptych.inference.generate import Timings
from diptych.tui.adapters import adapters_dir
from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.draft import attach_draft, cache_bytes
from diptych.tui.paths import database_path
from diptych.tui.screens.model_picker import ModelPicker
from diptych.tui.screens.settings import SettingsScreen
from diptych.tui.store import Store
from diptych.tui.widgets.status import MIB, speeds

from .conftest import run
from .test_app_actions import SIZE, open_first_chat, saved_chat
from .test_chat_app import send, wait_for
from .test_chat_command import small_adapter


async def choose(pilot, select_id, label):
    """Open a Select with the keyboard and pick the option shown as `label`."""
    select = pilot.app.screen.query_one(f"#{select_id}", Select)
    select.focus()
    await pilot.press("enter")
    labels = [str(prompt) for prompt, _ in select._options]
    await pilot.press(*["down"] * labels.index(label), "enter")
    await pilot.pause()


def test_lookup_and_a_draft_model_are_chosen_and_kept_per_chat(tmp_path):
    chat = saved_chat()
    draft = tmp_path / "small.gguf"

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await pilot.press("ctrl+s")
            await choose(pilot, "speculative", "prompt lookup")
            await pilot.press("ctrl+s")
            assert not isinstance(app.screen, SettingsScreen)
            assert app.chat.settings.speculative == "lookup"

            await pilot.press("ctrl+s")
            screen = app.screen
            assert screen.query_one("#speculative", Select).value == "lookup"
            screen.query_one("#draft", Button).press()
            await pilot.pause()
            picker = app.screen
            assert isinstance(picker, ModelPicker) and not picker.query("#adapter")
            await pilot.press(*str(draft), "enter")
            assert app.screen is screen
            assert str(screen.query_one("#draft", Button).label) == "small.gguf"
            assert screen.query_one("#speculative", Select).value == "draft"
            screen.query_one("#draft_max").value = "4"
            screen.query_one("#lookup_ngram").value = "2"
            await pilot.press("ctrl+s")
            assert not isinstance(app.screen, SettingsScreen)

    run(body())
    saved = Store(database_path()).chat(chat.id).settings
    assert (saved.speculative, saved.draft, saved.draft_max) == ("draft", str(draft), 4)
    assert saved.lookup_ngram == 2


def test_the_model_picker_offers_trained_adapters(tmp_path):
    run_dir = adapters_dir() / "facts"
    run_dir.mkdir(parents=True)
    (run_dir / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapters_dir() / "not-an-adapter").mkdir()

    async def body():
        app = DiptychApp(autoload=False)
        loads = []
        app.load_model = lambda source, backend, adapter=None: loads.append((source, adapter))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+o")
            options = app.screen.query_one("#adapter", Select)._options
            assert [str(label) for label, _ in options] == ["none", "facts"]
            await pilot.press("tab", "tab")  # the path field, the model list, the adapter
            await choose(pilot, "adapter", "facts")
            app.screen.query_one("#model-path").focus()
            await pilot.press(*"/models/mine.gguf", "enter")
            await pilot.press("ctrl+o", "tab", "tab", "tab", *"/my/lora.gguf", "enter")
            assert app.focused.id == "model-list"
            await pilot.press("enter")  # the first choice: the default model (None)
        return loads

    loads = run(body())
    assert [(str(s), a) for s, a in loads] == [("/models/mine.gguf", str(run_dir)),
                                               ("None", "/my/lora.gguf")]


@pytest.mark.real
def test_choosing_lookup_makes_the_next_reply_speculative(smollm2_path, tmp_path, monkeypatch):
    """The app as `diptych chat MODEL --adapter A --draft-max 3` starts it: a plain reply,
    then prompt lookup chosen in the settings, and the next reply drafts; the status bar
    shows its acceptance while it streams (refreshed with every drawn piece here). Then a
    draft model: it loads with the next reply, and both caches are counted."""
    monkeypatch.setattr(chat_screen, "SAVE_EVERY_S", 0.0)
    adapter = small_adapter(smollm2_path, tmp_path / "adapter")
    options = app_options(build_parser().parse_args(
        ["chat", str(smollm2_path), "--adapter", str(adapter), "--draft-max", "3",
         "--temperature", "0", "--max-tokens", "8", "--n-ctx", "256", "--backend", "torch"]))

    async def body():
        app = DiptychApp(options.pop("source"), **options)
        async with app.run_test(size=(200, 36)) as pilot:  # room for every status figure
            await wait_for(pilot, lambda: app.model is not None)
            await send(pilot, "Say one two three.")
            assert "accepted" not in app.chat.status.text
            await pilot.press("ctrl+s")
            app.screen.query_one("#draft_max").value = "9"
            await choose(pilot, "speculative", "prompt lookup")
            await pilot.press("ctrl+s")  # refused: the caches roll back 3 tokens
            assert any("at most 3 tokens" in n.message for n in app._notifications)
            app.screen.query_one("#draft_max").value = ""
            await pilot.press("ctrl+s")
            assert not isinstance(app.screen, SettingsScreen)
            # every text the status bar shows, however fast the reply streams
            seen, bar = [], app.chat.status
            shown = bar._update
            bar._update = lambda facts: (shown(facts), seen.append(bar.text))
            await pilot.press(*"Repeat: one two three four one two three four", "enter")
            await wait_for(pilot, lambda: any("accepted" in text for text in seen)
                           and not app.chat.generating)
            await pilot.pause()
            status = app.chat.status.text
            chat_id = app.chat.chat.id
            # a draft model (the same file: it has the model's tokenizer) loads with the next
            # reply, and the status bar counts its cache beside the model's
            app.chat.settings = replace(app.chat.settings, speculative="draft",
                                        draft=str(smollm2_path))
            await send(pilot, "Repeat: five six seven eight")
            return app.model, chat_id, seen, status, app.chat.status.text

    model, chat_id, seen, status, drafted = run(body())
    assert model.adapter == str(adapter) and model.engine.max_rollback == 3
    assert f"+ {adapter.name}" in status and "accepted" in status and "tok/pass" in status
    assert any("generating…" in text and "accepted" in text for text in seen)
    assert Store(database_path()).chat(chat_id).settings.speculative == "lookup"
    assert model.draft.path == smollm2_path and "accepted" in drafted
    target, draft = cache_bytes(model)
    assert 0 < draft == model.draft.engine.cache_bytes and target == model.engine.cache_bytes
    assert f"KV {target / MIB:.0f} MiB + draft {draft / MIB:.0f} MiB" in drafted
    assert not attach_draft(model, str(smollm2_path))  # kept, not loaded again


def test_acceptance_in_the_status_bar_and_settings_read_back():
    timings = Timings(prompt_tokens=10, prefill_s=1.0, generated_tokens=7, decode_s=1.0,
                      drafted=8, accepted=4, verify_passes=2)
    assert speeds(timings).endswith("accepted 50% · 3.00 tok/pass")
    settings, wrong = ChatSettings.from_json(
        '{"speculative": "warp", "draft": "d.gguf", "draft_max": 4, "temperature": 0}')
    assert wrong == ["speculative='warp'"]
    assert (settings.speculative, settings.draft, settings.draft_max) == (None, "d.gguf", 4)
    with pytest.raises(DiptychError, match="needs a draft model"):
        ChatSettings(speculative="draft").validate()
    with pytest.raises(DiptychError, match="lookup_ngram must be a positive integer"):
        ChatSettings(speculative="lookup", lookup_ngram=0).validate()
    # unset, the n-gram is Model.stream's default; set, it reaches Model.stream
    assert "lookup_ngram" not in ChatSettings(speculative="lookup").generation_kwargs()
    assert ChatSettings(speculative="lookup", lookup_ngram=2).generation_kwargs()[
        "lookup_ngram"] == 2
