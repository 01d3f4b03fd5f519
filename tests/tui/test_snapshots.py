"""Snapshots of the main screens (pytest-textual-snapshot) in both themes, with saved chats
and no model so that nothing on screen depends on timing. `pytest --snapshot-update`
re-records them."""

from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.paths import database_path
from diptych.tui.store import Store
from diptych.tui.widgets.prompt import PromptArea

SIZE = (110, 32)
REPLY = """Use a list comprehension:

```python
squares = [n * n for n in range(10)]
print(squares)  # a line too long for the pane scrolls sideways, and a scroll bar says so
```

It prints the first ten **square numbers**."""


def saved_chats():
    store = Store(database_path())
    store.new_chat("An older chat", ChatSettings())
    chat = store.new_chat("Squares in Python", ChatSettings(system="You write Python."))
    store.add_message(chat.id, "user", "How do I list the first ten squares in Python?")
    store.add_message(chat.id, "assistant", REPLY)
    store.close()


def opening(*keys):
    async def run_before(pilot):
        await pilot.pause()
        pilot.app.query_one(PromptArea).cursor_blink = False
        pilot.app.query_one("#chats").focus()
        await pilot.press("down", "enter")
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()
    return run_before


def test_chat_screen(snap_compare):
    saved_chats()
    assert snap_compare(DiptychApp(autoload=False), terminal_size=SIZE, run_before=opening())


def test_chat_screen_light_theme(snap_compare):
    saved_chats()
    assert snap_compare(DiptychApp(autoload=False), terminal_size=SIZE,
                        run_before=opening("ctrl+t"))


def test_settings_screen(snap_compare):
    saved_chats()
    assert snap_compare(DiptychApp(autoload=False), terminal_size=SIZE,
                        run_before=opening("ctrl+s"))


def test_model_picker(snap_compare, no_downloads):
    saved_chats()
    assert snap_compare(DiptychApp(autoload=False), terminal_size=SIZE,
                        run_before=opening("ctrl+o"))
