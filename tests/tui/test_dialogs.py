"""Each dialog takes typing as it opens, Enter saves or confirms, Escape cancels, and the
footer shows the dialog's own keys (the real app, driven by Textual's Pilot, no model)."""

from textual.widgets import Input, TextArea
from textual.widgets._footer import FooterKey

from diptych.tui.app import DiptychApp
from diptych.tui.screens.dialogs import Confirm, TextPrompt
from diptych.tui.screens.model_picker import ModelPicker
from diptych.tui.screens.settings import SettingsScreen

from .conftest import run
from .test_app_actions import SIZE, open_first_chat, saved_chat


async def footer_keys(pilot) -> dict[str, str]:
    """The keys the footer shows, once it has recomposed for the screen in front."""
    for _ in range(100):
        await pilot.pause(0.05)
        keys = {k.key: k.description for k in pilot.app.screen.query(FooterKey)}
        if keys:
            return keys
    return {}


def test_settings_take_typing_enter_saves_escape_cancels():
    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SettingsScreen)
            assert isinstance(app.focused, TextArea) and app.focused.id == "system"
            assert {"escape": "Cancel", "ctrl+s": "Save"}.items() <= (await footer_keys(pilot)).items()
            await pilot.press(*"Be brief.", "tab", *"0.3", "enter")
            assert not isinstance(app.screen, SettingsScreen)
            assert app.default_settings.system == "Be brief."
            assert app.default_settings.temperature == 0.3
            assert app.default_settings.top_p is None  # left empty: the model's default

            await pilot.press("ctrl+s", "tab", "ctrl+u", *"0.9", "escape")
            assert not isinstance(app.screen, SettingsScreen)
            assert app.default_settings.temperature == 0.3

            await pilot.press("ctrl+s", "tab", "ctrl+u", *"hot", "enter")
            assert isinstance(app.screen, SettingsScreen)  # refused with a notice, kept open
            assert any("not a number" in n.message for n in app._notifications)
    run(body())


def test_model_picker_takes_a_path_typed_at_once():
    async def body():
        app = DiptychApp(autoload=False)
        loads = []
        app.load_model = lambda source, backend, adapter=None: loads.append(source)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+o")
            assert isinstance(app.screen, ModelPicker)
            assert app.focused.id == "model-path"
            assert (await footer_keys(pilot)).get("escape") == "Cancel"
            await pilot.press("enter")  # nothing typed: stays open, loads nothing
            assert isinstance(app.screen, ModelPicker) and loads == []
            await pilot.press(*"/models/mine.gguf", "enter")
            assert not isinstance(app.screen, ModelPicker)
            assert [str(s) for s in loads] == ["/models/mine.gguf"]

            await pilot.press("ctrl+o", *"x", "escape")
            assert not isinstance(app.screen, ModelPicker) and len(loads) == 1
    run(body())


def test_rename_and_delete_dialogs():
    saved_chat()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await pilot.press("f2")
            assert isinstance(app.screen, TextPrompt) and isinstance(app.focused, Input)
            assert (await footer_keys(pilot)) == {"escape": "Cancel"}
            await pilot.press("ctrl+u", *"Squares", "escape")
            assert app.chat.chat.title == "Say hi"
            await pilot.press("f2", "ctrl+u", *"Squares", "enter")
            assert app.chat.chat.title == "Squares"

            app.chat.action_delete_chat()
            await pilot.pause()
            assert isinstance(app.screen, Confirm)
            assert {"escape": "Cancel", "y": "Yes"}.items() <= (await footer_keys(pilot)).items()
            await pilot.press("escape")
            assert app.store.chats()
            app.chat.action_delete_chat()
            await pilot.pause()
            await pilot.press("enter")
            await pilot.pause()
            assert app.store.chats() == []
    run(body())
