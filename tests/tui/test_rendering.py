"""How replies look: every region of the screen and of its dialogs takes its background
from the theme (both themes Ctrl+T switches between), and a code line wider than the pane
scrolls sideways with a visible scroll bar instead of being clipped."""

from textual.widgets import Button
from textual.widgets.markdown import MarkdownFence

from diptych.tui.app import THEMES, DiptychApp
from diptych.tui.widgets.message import CODE_SCROLL_STEP, MessageView

from .conftest import run
from .test_app_actions import SIZE, open_first_chat, saved_chat

LONG_LINE = "total = " + " + ".join(f"value_{i}" for i in range(30)) + "  # END"
REPLY = (f"Here:\n\n```python\n{LONG_LINE}\n```\n\nand a short one:\n\n```\nok\n```\n\n"
         "| a | b |\n|---|---|\n| 1 | 2 |\n\n> a quote\n\n- an item\n\n**bold** and `code`.")


def with_the_reply_open(check):
    """Run `await check(app, pilot)` with a saved chat, whose reply is REPLY, open."""
    saved_chat(reply=REPLY)

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            await open_first_chat(pilot)
            await check(app, pilot)

    run(body())


def test_every_region_takes_the_themes_background():
    def off_theme(app):
        """The visible widgets of the screen on top whose background is not the theme's
        kind (light or dark), and all those shown. Coloured buttons (Save, Stop) are
        accents in either theme."""
        shown = [w for w in app.screen.walk_children() if w.region.area
                 and not (isinstance(w, Button) and w.variant != "default")]
        dark = app.current_theme.dark
        return [w for w in shown if (w.background_colors[1].brightness > 0.5) == dark], shown

    async def check(app, pilot):
        app.chat.transcript.messages[-1].focus()  # a focused message too
        for theme in THEMES:
            app.theme = theme
            await pilot.pause()
            bad, shown = off_theme(app)
            assert len(shown) > 40 and any(isinstance(w, MarkdownFence) for w in shown)
            assert not bad, (theme, bad)
            for key in ("ctrl+s", "ctrl+o"):  # the settings and the model picker dialogs
                await pilot.press(key)
                bad, shown = off_theme(app)
                assert len(shown) > 5 and not bad, (theme, key, bad)
                await pilot.press("escape")

    with_the_reply_open(check)


def test_a_long_code_line_scrolls_sideways_with_a_visible_bar():
    async def check(app, pilot):
        view: MessageView = app.chat.transcript.messages[-1]
        long, short = view.query(MarkdownFence)
        assert long.max_scroll_x > 0 and long.scrollbar_size_horizontal == 1
        assert long.show_horizontal_scrollbar
        assert short.max_scroll_x == 0 and not short.show_horizontal_scrollbar
        # the focused message's code scrolls with → and ←; the line's end comes into view
        assert "# END" not in screen_text(app)
        view.focus()
        await pilot.press("right", "right")
        assert long.scroll_x == 2 * CODE_SCROLL_STEP and short.scroll_x == 0
        await pilot.press("left")
        assert long.scroll_x == CODE_SCROLL_STEP
        long.scroll_to(x=long.max_scroll_x, animate=False, immediate=True)
        await pilot.pause()
        assert "# END" in screen_text(app)

    with_the_reply_open(check)


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())
