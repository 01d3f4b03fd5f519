"""The chat list: F3 jumps to its search field, typing filters it, each chat is one line
(the title cut with an ellipsis, and its age), Enter opens the chat found."""

from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.paths import database_path
from diptych.tui.store import Store
from diptych.tui.widgets.sidebar import ChatList, relative_age

from .conftest import run
from .test_app_actions import SIZE

LONG = "Squares in Python, and cubes, and a title far too long for the list"


def test_relative_age():
    assert [relative_age(s) for s in (5, 60, 7200, 3 * 86400, 15 * 86400)] == \
        ["now", "1m", "2h", "3d", "2w"]


def test_f3_filters_the_list_and_enter_opens_a_chat():
    store = Store(database_path())
    store.new_chat(LONG, ChatSettings())
    store.new_chat("Another chat", ChatSettings())
    store.close()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            chats = app.query_one(ChatList)
            await pilot.pause()
            lines = [chats.render_line(y).text for y in range(2)]
            assert "Another chat" in lines[0] and lines[0].rstrip().endswith("now")
            assert "Squares in" in lines[1] and "…" in lines[1] and "now" in lines[1]
            await pilot.press("f3")
            assert app.focused.id == "chat-filter"
            await pilot.press(*"squ")
            await pilot.pause()
            assert chats.option_count == 1
            await pilot.press("enter")
            assert app.focused is chats
            await pilot.press("enter")
            await pilot.pause()
            assert app.chat.chat.title == LONG
    run(body())
