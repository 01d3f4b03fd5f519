"""The app's chat management without a model: long chats, copy, rename, export, delete,
settings, the command palette, themes and the double Ctrl+C."""

import sqlite3

from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.models import configured_folders
from diptych.tui.paths import database_path
from diptych.tui.screens.dialogs import Confirm, TextPrompt
from diptych.tui.screens.model_picker import ModelPicker
from diptych.tui.screens.settings import SettingsScreen
from diptych.tui.store import Store
from diptych.tui.widgets.prompt import PromptArea

from .conftest import run
from .test_chat_app import wait_for

SIZE = (110, 36)
REPLY = "Two ways:\n\n```python\nprint('hi')\n```\n\n```sh\necho hi\n```\n"


def saved_chat(n_pairs=1, reply=REPLY):
    store = Store(database_path())
    chat = store.new_chat("Say hi", ChatSettings(system="Be brief."), "m.gguf")
    for i in range(n_pairs):
        store.add_message(chat.id, "user", f"Say hi ({i})")
        store.add_message(chat.id, "assistant", reply)
    store.close()
    return chat


async def open_first_chat(pilot):
    pilot.app.query_one("#chats").focus()
    await pilot.press("down", "enter")
    await pilot.pause()


async def scroll_to_top(pilot, mounted):
    """Scroll the transcript to its top, where a page of older messages loads; wait until
    `mounted` messages are there and the view is back where it was (the app scrolls it
    after the next refresh: until then a new scroll to the top does not move it, and loads
    nothing)."""
    transcript = pilot.app.chat.transcript
    transcript.scroll_home(animate=False, immediate=True)
    await wait_for(pilot, lambda: len(transcript.messages) == mounted and transcript.scroll_y > 0)


def test_a_long_chat_mounts_only_recent_messages():
    saved_chat(n_pairs=50, reply="ok")

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            views = app.chat.transcript.messages
            assert len(views) == 30 and views[-1].content == "ok"
            button = app.query_one("#load-older")
            assert button.display and "70 in all" in str(button.label)
            # each page is waited for itself, not for "idle", which a loaded machine reaches
            # before the page is in place
            await scroll_to_top(pilot, 60)
            assert app.chat.transcript.messages[0].content == "Say hi (20)"
            await scroll_to_top(pilot, 90)
            await scroll_to_top(pilot, 100)
            assert not button.display

    run(body())


def test_copy_a_reply_and_its_code_blocks():
    saved_chat()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await pilot.press("ctrl+g")
            assert app.clipboard == REPLY
            await pilot.press("ctrl+b")
            assert app.clipboard == "print('hi')\n"
            app.chat.transcript.messages[-1].focus()
            await pilot.press("b")
            assert app.clipboard == "echo hi\n"
            await pilot.press("c")
            assert app.clipboard == REPLY

    run(body())


def test_rename_export_and_delete_a_chat(tmp_path):
    chat = saved_chat()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await pilot.press("f2")
            assert isinstance(app.screen, TextPrompt)
            await pilot.press(*["backspace"] * 6, *"Greetings", "enter")
            assert app.query_one("#chats").titles[0] == "Greetings"

            app.query_one("#chats").focus()
            await pilot.press("e")
            assert isinstance(app.screen, TextPrompt)
            await pilot.press("enter")  # the proposed file in the working folder
            exported = (tmp_path / f"greetings-{chat.id}.md").read_text()
            assert exported.startswith("# Greetings") and "```sh\necho hi\n```" in exported

            await pilot.press("d")
            assert isinstance(app.screen, Confirm)
            await pilot.press("y")
            await pilot.pause()
            assert app.query_one("#chats").option_count == 0
            assert app.chat.transcript.messages == [] and app.chat.chat is None

    run(body())
    db = sqlite3.connect(database_path())
    assert db.execute("SELECT COUNT(*) FROM chats").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_settings_are_validated_and_saved_per_chat():
    chat = saved_chat()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SettingsScreen)
            app.screen.query_one("#temperature").value = "hot"
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SettingsScreen)  # refused, with the reason shown
            assert any("is not a number" in n.message for n in app._notifications)
            app.screen.query_one("#temperature").value = "0.3"
            app.screen.query_one("#seed").value = "7"
            app.screen.query_one("#top_p").value = "2"
            await pilot.press("ctrl+s")
            assert any("top_p must be in (0, 1]" in n.message for n in app._notifications)
            app.screen.query_one("#top_p").value = "0.5"
            await pilot.press("ctrl+s")
            assert not isinstance(app.screen, SettingsScreen)

    run(body())
    saved = Store(database_path()).chat(chat.id).settings
    assert (saved.temperature, saved.seed, saved.top_p, saved.system) == (0.3, 7, 0.5, "Be brief.")


def test_model_picker_searches_a_typed_folder(tmp_path, no_downloads):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+o")
            picker = app.screen
            assert isinstance(picker, ModelPicker) and len(picker.choices) == 1
            picker.query_one("#model-path").value = str(tmp_path / "models")
            picker.query_one("#model-path").focus()
            await pilot.press("enter")
            assert [c.path for c in picker.choices] == [None, tmp_path / "models" / "tiny.gguf"]
            assert app.screen is picker
            await pilot.press("escape")

    run(body())
    assert configured_folders() == [tmp_path / "models"]


def test_palette_theme_and_double_ctrl_c():
    saved_chat()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for title in ("New chat", "Load model", "Chat settings", "Regenerate reply",
                          "Edit last message", "Continue reply", "Stop generation",
                          "Copy last reply", "Copy code block", "Rename chat", "Delete chat",
                          "Export chat"):
                assert title in titles
            await pilot.press("ctrl+p", *"Rename chat")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, TextPrompt)
            await pilot.press("escape")

            assert app.theme == "textual-dark"
            await pilot.press("ctrl+t")
            assert app.theme == "textual-light"

            await pilot.press("ctrl+c")
            assert app.return_code is None
            assert any("Ctrl+C again" in n.message for n in app._notifications)
            await pilot.press("ctrl+c")
            assert app.return_code == 0

    run(body())
    assert Store(database_path()).preference("theme") == "textual-light"

    async def restart():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE):
            return app.theme

    assert run(restart()) == "textual-light"


def test_ctrl_j_inserts_a_newline_and_enter_without_a_model_sends_nothing():
    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a", "ctrl+j", "b")
            prompt = app.query_one(PromptArea)
            assert prompt.text == "a\nb"
            await pilot.press("enter")
            assert prompt.text == "a\nb" and app.chat.transcript.messages == []
            assert any("No model is loaded" in n.message for n in app._notifications)

    run(body())
    assert Store(database_path()).chats() == []
