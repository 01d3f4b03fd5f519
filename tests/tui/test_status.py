"""The status bar: speed figures labelled with their unit and shown only once measured; the
context count following every change of the model's cache; on a narrow terminal, the least
useful parts left out."""

import pytest

from diptych.inference.generate import Timings
from diptych.tui.widgets.status import fit, speeds

from .conftest import run
from .test_chat_app import SIZE, fed_tokens, make_app, send, transcript


def test_speeds_are_labelled_and_hidden_until_known():
    timings = Timings(prompt_tokens=82)
    assert speeds(timings) == ""  # nothing measured yet: no "decode 0.0 tok/s"
    timings.prefill_s, timings.generated_tokens = 1.0, 1
    assert speeds(timings) == "prompt 82 tok/s"  # the first token comes from the prompt
    timings.generated_tokens, timings.decode_s = 15, 1.0
    assert speeds(timings) == "prompt 82 tok/s · decode 14.0 tok/s"


PARTS = {"note": "generating…", "backend": "torch (cpu)", "model": "M", "quant": "Q4_1",
         "adapter": "+ ad",
         "context": "context 9/64", "speeds": "decode 5.0 tok/s", "kv": "KV 1 MiB",
         "memory": "300 MiB"}


def test_a_narrow_bar_leaves_out_memory_then_the_cache_backend_quant_model_and_speeds():
    full = ("generating… │ torch (cpu) │ M Q4_1 + ad │ context 9/64 │ decode 5.0 tok/s │ "
            "KV 1 MiB │ 300 MiB")
    assert fit(PARTS, 200) == fit(PARTS, len(full)) == full
    assert fit(PARTS, len(full) - 1) == full.removesuffix(" │ 300 MiB")
    assert fit(PARTS, 59) == "generating… │ M Q4_1 + ad │ context 9/64 │ decode 5.0 tok/s"
    assert fit(PARTS, 58) == "generating… │ M + ad │ context 9/64 │ decode 5.0 tok/s"
    assert fit(PARTS, 53) == "generating… │ context 9/64 │ decode 5.0 tok/s"
    assert fit(PARTS, 40) == "generating… │ context 9/64"  # never less than these
    assert fit(PARTS, 5) == "generating… │ context 9/64"
    assert fit({**PARTS, "note": "", "speeds": ""}, 200) == (
        "torch (cpu) │ M Q4_1 + ad │ context 9/64 │ KV 1 MiB │ 300 MiB")


@pytest.mark.real
def test_an_80_column_terminal_shows_the_context_and_speeds(model):
    async def body():
        app = make_app(model, max_tokens=4)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "Hi")
            narrow = app.chat.status.text
            await pilot.resize_terminal(200, 24)
            await pilot.pause()
            return narrow, app.chat.status.text

    narrow, wide = run(body())
    assert len(narrow) <= 80 and "context" in narrow and "decode" in narrow
    assert "KV" not in narrow and "KV" in wide and wide.startswith("torch (cpu) │ SmolLM2")


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
