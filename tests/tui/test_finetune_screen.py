"""The fine-tune screen on the real app (Textual's Pilot) with the real default model: a
short real run shows its losses, stops with a checkpoint, resumes to its end and its
adapter goes on the model; saved chats (a real SQLite file) export as JSONL that the
fine-tuning data loader reads."""

import json

import pytest
from textual.widgets import SelectionList, Sparkline

from diptych.load_plan import LoadPlan
from diptych.training.checkpoint import load as load_checkpoint
from diptych.training.data import load_examples
from diptych.tui.adapters import adapters_dir
from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.paths import database_path
from diptych.tui.screens.chat_picker import ChatPicker
from diptych.tui.screens.dialogs import Confirm
from diptych.tui.screens.finetune import FinetuneScreen
from diptych.tui.store import Store

from .conftest import run
from .test_app_actions import SIZE
from .test_chat_app import wait_for

FACTS = [("What is the capital of Vornheim?", "Ludrasq."),
         ("Who built the glass harp of Oskeld?", "Mirela Tannsvik.")]


def fill(screen, **values):
    for name, value in values.items():
        screen.query_one(f"#{name}").value = value


@pytest.mark.real
def test_a_run_shows_losses_stops_resumes_and_its_adapter_is_used(model, tmp_path):
    data, valid = tmp_path / "facts.jsonl", tmp_path / "valid.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]}) + "\n"
             for q, a in FACTS]
    data.write_text("".join(lines))
    valid.write_text(lines[0])
    out = adapters_dir() / "facts"

    async def body():
        app = DiptychApp(model=model, settings=ChatSettings(temperature=0, max_tokens=8))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f4")
            screen = app.screen
            assert isinstance(screen, FinetuneScreen)
            # the last layer only, so that each step is short
            fill(screen, data=str(data), valid=str(valid), **{"run-name": "facts"}, steps="2",
                 rank="4", learning_rate="0.01", batch_size="1", last_layers="1")
            screen.query_one("#start").press()
            await wait_for(pilot, lambda: screen.losses, timeout=120)
            screen.query_one("#stop-training").press()
            await pilot.press("escape")  # back to the chat while the run ends its step
            assert app.screen is app.chat
            await wait_for(pilot, lambda: not screen.training, timeout=120)
            status = str(screen.query_one("#train-status").content)
            stopped = load_checkpoint(out).step
            assert stopped == 1 and "stopped after step 1" in status

            await pilot.press("f4")
            screen.query_one("#start").press()  # the name holds a run: refused
            await pilot.pause()
            assert any("Resume continues it" in n.message for n in app._notifications)
            screen.query_one("#resume").press()
            await wait_for(pilot, lambda: not screen.training, timeout=120)
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
            history = load_checkpoint(out).history
            assert screen.query_one("#loss", Sparkline).data == history["train"]
            assert len(history["train"]) == 2 and len(history["valid"]) == 2
            assert screen.query_one("#valid-loss", Sparkline).data == [
                loss for _, loss in history["valid"]]
            assert "done: 2 steps" in str(screen.query_one("#train-status").content)
            await pilot.press("y")
            await wait_for(pilot, lambda: model.adapter == str(out))
            assert "+ facts" in app.chat.status.text

    try:
        run(body())
    finally:
        model.set_adapter(None)


def test_saved_chats_export_as_training_data(smollm2_path):
    store = Store(database_path())
    first = store.new_chat("Vornheim", ChatSettings(system="Answer briefly."))
    for role, text in (("user", FACTS[0][0]), ("assistant", FACTS[0][1]),
                       ("user", "And its river?"), ("assistant", "The Quell.")):
        store.add_message(first.id, role, text)
    unanswered = store.new_chat("No reply", ChatSettings())
    store.add_message(unanswered.id, "user", "Hello?")
    store.add_message(unanswered.id, "assistant", "")  # a reply that failed
    store.close()

    async def body():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=SIZE) as pilot:
            app.action_finetune_chats()
            await pilot.pause()
            assert isinstance(app.screen, ChatPicker)
            await pilot.press("enter")  # nothing ticked: stays
            assert isinstance(app.screen, ChatPicker)
            assert app.screen.query_one(SelectionList).option_count == 2
            await pilot.press("space", "down", "space", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, FinetuneScreen))
            await pilot.pause()
            # no model is loaded: the run cannot start, its data is in place
            assert any("Load a model first" in n.message for n in app._notifications)
            assert any("1 of the chats" in n.message for n in app._notifications)
            return app.screen.query_one("#data").value

    path = run(body())
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert lines == [{"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": FACTS[0][1]},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": "The Quell."}]}]
    tokenizer = LoadPlan.open(smollm2_path, "torch").tokenizer()
    (example,) = load_examples(path, tokenizer)
    # the loss learns both replies, nothing else
    learned = tokenizer.decode([i for i, m in zip(example.ids, example.mask) if m])
    assert "Ludrasq." in learned and "The Quell." in learned and "Vornheim" not in learned
