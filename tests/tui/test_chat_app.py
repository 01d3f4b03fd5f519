"""The chat app driven through Textual's Pilot with the real default model: replies stream
into the transcript and the SQLite file, Escape stops, regenerate and edit-resend rewind the
model's cache, chats reopen after a restart, and model loading reports errors."""

import asyncio
import sqlite3
import time
from contextlib import contextmanager

from textual import events

import diptych
from diptych.backends import available

from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.context_window import fit_messages
from diptych.tui.screens.model_picker import ModelPicker
from diptych.tui.widgets.prompt import PromptArea

from .conftest import run

SIZE = (110, 36)


def make_app(model, max_tokens=24):
    return DiptychApp(model=model, settings=ChatSettings(temperature=0, max_tokens=max_tokens))


def rows(data_dir):
    db = sqlite3.connect(data_dir / "chats.sqlite3")
    return db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()


async def wait_for(pilot, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def send(pilot, text):
    await pilot.press(*text, "enter")
    await replied(pilot)


async def replied(pilot):
    """Wait until the reply is finished and its generation thread has left the model."""
    await wait_for(pilot, lambda: not pilot.app.chat.generating)
    await pilot.pause()


async def type_keys(app, text):
    """Send key events as a terminal would (Pilot.press waits for the whole process to go
    idle, which it never does while a reply streams); returns each key's handling time."""
    prompt = app.query_one(PromptArea)
    latencies = []
    for char in text:
        expected = prompt.text + char
        t0 = time.monotonic()
        app._driver.send_message(events.Key("space" if char == " " else char, char))
        while prompt.text != expected:
            assert time.monotonic() - t0 < 10, "key not handled"
            await asyncio.sleep(0.002)
        latencies.append(time.monotonic() - t0)
    return latencies


@contextmanager
def fed_tokens(engine):
    """The token ids `engine` evaluates (prefill and decode steps) while the block runs."""
    seq = engine.main  # the sequence a Model generates in
    fed, real = [], seq.eval

    def counting(ids, *args, **kwargs):
        fed.extend(ids)
        return real(ids, *args, **kwargs)

    seq.eval = counting
    try:
        yield fed
    finally:
        del seq.eval


def transcript(app):
    return [(v.role, v.content) for v in app.chat.transcript.messages]


def greedy(model, messages, max_tokens):
    return model.chat(messages, max_tokens=max_tokens, temperature=0)


def test_reply_streams_into_transcript_and_database(model, data_dir):
    async def body():
        app = make_app(model)
        async with app.run_test(size=(200, 36)) as pilot:  # room for every status figure
            await send(pilot, "What is the capital of France?")
            (_, question), (role, reply) = transcript(app)
            assert role == "assistant" and "Paris" in reply
            assert rows(data_dir) == [("user", "What is the capital of France?"),
                                      ("assistant", reply)]
            status = app.chat.status.text
            for part in ("torch (cpu)", "SmolLM2-135M-Instruct.Q4_1 Q4_1/Q8_0",
                         f"context {model.engine.n_cached}/1024", "decode", "MiB"):
                assert part in status
            assert app.chat.sub_title == "What is the capital of France?"
        assert reply == greedy(model, [{"role": "user", "content": question}], 24)

    run(body())


def test_keys_are_handled_while_a_reply_streams_and_escape_stops_it(model, data_dir,
                                                                   smollm2_path):
    story = "Tell me a long story about a dragon and a knight."

    async def body():
        app = make_app(model, max_tokens=400)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*story, "enter")
            await wait_for(pilot, lambda: len(app.chat.transcript.messages) == 2
                           and len(app.chat.transcript.messages[1].content) > 20)
            reply_view = app.chat.transcript.messages[1]
            before = len(reply_view.content)
            latencies = await type_keys(app, "typed while streaming")
            # the keys were handled at once while the model kept generating
            assert app.chat.generating and app.query_one(PromptArea).text == "typed while streaming"
            # each key is handled between two of the reply's steps; one stall of 0.73 s was
            # seen on the 2-core CI machine, hence a bound per key and a tighter median
            assert max(latencies) < 1.0 and sorted(latencies)[len(latencies) // 2] < 0.1, \
                latencies
            await wait_for(pilot, lambda: len(reply_view.content) > before)
            # another process (or this one after a crash) already finds most of the reply
            await wait_for(pilot, lambda: len(rows(data_dir)[-1][1]) > 0)
            partial = rows(data_dir)[-1]
            assert partial[0] == "assistant" and reply_view.content.startswith(partial[1])
            await pilot.press("escape")
            await replied(pilot)
            kept = reply_view.content
            assert kept and reply_view.query_one(".note").content == "stopped"
            assert rows(data_dir)[-1] == ("assistant", kept)
            assert "stopped" in app.chat.status.text
            assert len(model.tokenize(kept, add_bos=False)) < 300  # well before max_tokens
            return kept

    kept = run(body())
    fresh = diptych.load(smollm2_path, backend="torch", n_ctx=1024)
    messages = [{"role": "user", "content": story}]
    # what was kept is the start of the uninterrupted reply ...
    assert greedy(fresh, messages, len(model.tokenize(kept, add_bos=False)) + 8).startswith(kept)
    # ... and the stopped model (its cache holding part of that reply) answers as a fresh one
    for messages in (messages, [{"role": "user", "content": "Hi"}]):
        assert greedy(model, messages, 8) == greedy(fresh, messages, 8)


def test_quitting_mid_reply_keeps_what_was_generated(model, data_dir):
    async def body():
        app = make_app(model, max_tokens=400)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"Tell me a story.", "enter")
            await wait_for(pilot, lambda: len(app.chat.transcript.messages) == 2
                           and len(app.chat.transcript.messages[1].content) > 10)
            app._driver.send_message(events.Key("ctrl+c", None))
            app._driver.send_message(events.Key("ctrl+c", None))
            await wait_for(pilot, lambda: app.return_code == 0)
            return app.chat.transcript.messages[1]

    view = run(body())
    role, saved = rows(data_dir)[-1]
    assert role == "assistant" and saved.startswith(view.content) and len(saved) > 10


def test_regenerate_and_edit_resend_rewind_the_cache(model, data_dir):
    async def body():
        app = make_app(model, max_tokens=8)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Name a color.")
            first = transcript(app)[-1][1]
            first_view = app.chat.transcript.messages[-1]
            with fed_tokens(model.engine) as fed:
                await pilot.press("ctrl+r")
                await replied(pilot)
            assert transcript(app) == [("user", "Name a color."), ("assistant", first)]
            assert rows(data_dir) == transcript(app)
            # the old reply was removed and a new one written in its place
            assert app.chat.transcript.messages[-1] is not first_view
            assert not first_view.is_attached
            question = [{"role": "user", "content": "Name a color."}]
            prompt_ids = model.chat_prompt(question)
            assert model.engine.tokens[:len(prompt_ids)] == prompt_ids
            # the cache was rewound to the prompt: its last token is fed again for its
            # logits, then each reply token but the last
            reply_ids = [t for p in model.chat_stream(question, max_tokens=8, temperature=0)
                         for t in p.token_ids]
            assert fed == prompt_ids[-1:] + reply_ids[:-1]

            await pilot.press("ctrl+l")
            assert app.query_one(PromptArea).text == "Name a color."
            assert transcript(app) == [] and rows(data_dir) == []
            await send(pilot, ["backspace"] * 6 + list("fruit."))
            edited = transcript(app)
            assert edited[0] == ("user", "Name a fruit.") and rows(data_dir) == edited
        assert edited[1][1] == greedy(model, [{"role": "user", "content": "Name a fruit."}], 8)

    run(body())


def test_a_chat_reopens_after_a_restart_and_continues(model, data_dir):
    async def first_run():
        app = make_app(model, max_tokens=8)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Hi! What is 2 + 2?")
            return transcript(app)

    async def second_run():
        app = make_app(model, max_tokens=8)
        async with app.run_test(size=SIZE) as pilot:
            chats = app.query_one("#chats")
            assert chats.option_count == 1
            chats.focus()
            await pilot.press("down", "enter")
            await pilot.pause()
            assert transcript(app) == before
            app.query_one(PromptArea).focus()
            await send(pilot, "And 3 + 3?")
            return transcript(app)

    before = run(first_run())
    greedy(model, [{"role": "user", "content": "Something else entirely."}], 1)  # other cache
    after = run(second_run())
    assert after[:2] == before and len(after) == 4 and rows(data_dir) == after
    history = [{"role": r, "content": c} for r, c in after[:3]]
    assert after[3][1] == greedy(model, history, 8)


def test_the_chat_list_narrows_on_a_narrow_terminal():
    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            widths = [app.chat.query_one("#sidebar").outer_size.width]
            await pilot.resize_terminal(110, 24)
            await pilot.pause()
            return widths + [app.chat.query_one("#sidebar").outer_size.width]

    assert run(body()) == [22, 30]


def test_switch_models_and_a_corrupt_file_shows_the_error(model, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)

    async def body():
        app = make_app(model, max_tokens=8)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+o")
            assert isinstance(app.screen, ModelPicker)
            await pilot.press(*str(broken), "enter")  # the path field has the focus
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.model is model and app.is_running
            errors = [n for n in app._notifications if n.severity == "error"]
            assert errors and "ModelFileError" in errors[-1].message
            assert "broken.gguf" in errors[-1].title

            await pilot.press("ctrl+o")
            await pilot.press("tab", "enter")  # to the list; its first choice: the default
            assert not isinstance(app.screen, ModelPicker)
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.model is not model and app.model.path == model.path
            assert any(n.message.startswith("Loaded ") for n in app._notifications)
            assert "context 0/1024" in app.chat.status.text

            if "mlx" in available():  # the backend is a setting where there is a choice
                await pilot.press("ctrl+s")
                app.screen.query_one("#backend").value = "mlx"
                await pilot.press("ctrl+s")
                await app.workers.wait_for_complete()
                await pilot.pause()
                assert app.model.backend.name == "mlx" and "mlx (cpu" in app.chat.status.text

    run(body())


def test_a_chat_longer_than_the_context_leaves_out_its_oldest_turns(model):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        messages += [{"role": "user", "content": f"Tell me about {i}. " + "word " * 60},
                     {"role": "assistant", "content": f"{i} is a number. " + "yes " * 40}]
    messages.append({"role": "user", "content": "Which number came last?"})
    assert len(model.chat_prompt(messages)) > model.n_ctx

    kept, dropped = fit_messages(model, messages, max_tokens=512)
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert kept[1:] == messages[1 + dropped:]
    assert len(model.chat_prompt(kept)) + model.n_ctx // 4 <= model.n_ctx
    assert len(model.chat_prompt(messages[:1] + messages[dropped - 1:])) + 256 > model.n_ctx
    assert fit_messages(model, messages[-3:], max_tokens=512) == (messages[-3:], 0)
