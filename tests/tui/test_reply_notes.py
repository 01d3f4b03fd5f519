"""A reply that ends at max tokens is marked "length" and Ctrl+F continues it from the
model's cache; one that ends on its own is not marked."""

import pytest

from .conftest import run
from .test_chat_app import SIZE, fed_tokens, greedy, make_app, replied, rows, send, transcript

LENGTH_NOTE = "length: cut at the token limit (Ctrl+F continues)"


def test_a_reply_cut_at_max_tokens_is_marked(model):
    async def body():
        app = make_app(model, max_tokens=3)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Tell me a long story about the sea.")
            reply = app.chat.transcript.messages[-1]
            assert reply.query_one(".note").content == LENGTH_NOTE
            assert len(model.tokenize(transcript(app)[-1][1], add_bos=False)) <= 3
    run(body())


@pytest.mark.real
def test_continue_goes_on_from_the_cache_where_the_limit_cut(model, data_dir):
    question = [{"role": "user", "content": "Tell me a long story about the sea."}]

    async def body():
        app = make_app(model, max_tokens=6)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, question[0]["content"])
            view = app.chat.transcript.messages[-1]
            cut = list(view.token_ids)
            with fed_tokens(model.engine) as fed:
                await pilot.press("ctrl+f")
                await replied(pilot)
            # the cut reply's last token (drawn, never fed) and then only the new ones
            assert len(view.token_ids) == 12 and view.token_ids[:6] == cut
            assert fed == cut[-1:] + view.token_ids[6:-1]
            # one message, continued in place, saved; cut again, so one note says so
            assert transcript(app) == rows(data_dir) == [("user", question[0]["content"]),
                                                         ("assistant", view.content)]
            assert [n.content for n in view.query(".note")] == [LENGTH_NOTE]
            return view.content

    assert run(body()) == greedy(model, question, 12)


def test_a_reply_that_ends_itself_has_no_note_and_does_not_continue(model):
    async def body():
        app = make_app(model, max_tokens=64)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "What is the capital of France?")
            reply = transcript(app)[-1][1]
            assert "Paris" in reply
            assert not app.chat.transcript.messages[-1].query(".note")
            await pilot.press("ctrl+f")
            await pilot.pause()
            assert not app.chat.generating and transcript(app)[-1][1] == reply
            assert any("Only a reply cut" in n.message for n in app._notifications)
    run(body())
