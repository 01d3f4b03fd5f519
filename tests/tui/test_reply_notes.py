"""A reply that ends at max tokens is marked "length"; one that ends on its own is not."""

from .conftest import run
from .test_chat_app import SIZE, make_app, send, transcript


def test_a_reply_cut_at_max_tokens_is_marked(model):
    async def body():
        app = make_app(model, max_tokens=3)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Tell me a long story about the sea.")
            reply = app.chat.transcript.messages[-1]
            assert reply.query_one(".note").content == "length: cut at the token limit"
            assert len(model.tokenize(transcript(app)[-1][1], add_bos=False)) <= 3
    run(body())


def test_a_reply_that_ends_itself_has_no_note(model):
    async def body():
        app = make_app(model, max_tokens=64)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "What is the capital of France?")
            assert "Paris" in transcript(app)[-1][1]
            assert not app.chat.transcript.messages[-1].query(".note")
    run(body())
