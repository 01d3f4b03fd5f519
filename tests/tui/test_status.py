"""The status bar: speed figures labelled with their unit and shown only once measured; the
context count following every change of the model's cache."""

import pytest

from diptych.inference.generate import Timings
from diptych.tui.widgets.status import speeds

from .conftest import run
from .test_chat_app import SIZE, fed_tokens, make_app, send, transcript


def test_speeds_are_labelled_and_hidden_until_known():
    timings = Timings(prompt_tokens=82)
    assert speeds(timings) == ""  # nothing measured yet: no "decode 0.0 tok/s"
    timings.prefill_s, timings.generated_tokens = 1.0, 1
    assert speeds(timings) == "prompt 82 tok/s"  # the first token comes from the prompt
    timings.generated_tokens, timings.decode_s = 15, 1.0
    assert speeds(timings) == "prompt 82 tok/s · decode 14.0 tok/s"


@pytest.mark.real
def test_the_context_count_follows_an_edit_and_a_new_chat(model):
    first = [{"role": "user", "content": "Name a color."}]

    async def body():
        app = make_app(model, max_tokens=8)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, first[0]["content"])
            first.append({"role": "assistant", "content": transcript(app)[-1][1]})
            await send(pilot, "Name a fruit.")
            before = model.engine.n_cached
            await pilot.press("ctrl+l")  # the second question and its reply are taken back
            kept = len(model.chat_prompt(first, add_generation_prompt=False))
            assert model.engine.n_cached == kept < before
            assert f"context {kept}/1024" in app.chat.status.text
            # what the cache kept is reused: the edited question feeds only its own tokens
            with fed_tokens(model.engine) as fed:
                await send(pilot, ["backspace"] * 6 + list("vegetable."))
            second = first + [{"role": "user", "content": "Name a vegetable."}]
            assert fed[:len(model.chat_prompt(second)) - kept] == model.chat_prompt(second)[kept:]
            await pilot.press("ctrl+n")
            assert model.engine.n_cached == 0 and "context 0/1024" in app.chat.status.text

    run(body())
