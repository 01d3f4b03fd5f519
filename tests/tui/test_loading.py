"""What the status bar shows before the first reply: the load bar fed from the loading
thread with the weights' bytes, and a message while the CPU kernels compile on first use
(a cold kernel cache: a fresh cache folder and no kernels compiled in this process)."""

import sys

import pytest
from textual.widgets import ProgressBar
from textual.widgets._toast import Toast

import diptych
from diptych.backends.torch.cpu import kernel_cache
from diptych.load_plan import LoadPlan
from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings

from .conftest import run
from .test_chat_app import SIZE, send, wait_for


@pytest.mark.real
def test_the_load_bar_moves_with_the_weights(smollm2_path):
    async def body():
        app = DiptychApp(autoload=False, n_ctx=256)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            bar = app.chat.status.query_one(ProgressBar)
            seen = []
            app.watch(bar, "progress", lambda done: seen.append((done, app.chat.status.text)),
                      init=False)
            app.load_model(smollm2_path, "torch")
            await wait_for(pilot, lambda: app.model is not None)
            await pilot.pause()
            assert not bar.display and "context 0/256" in app.chat.status.text
            # the "Loaded ..." notice covers neither the status bar nor the message box
            await wait_for(pilot, lambda: app.screen.query(Toast))
            toast = app.screen.query_one(Toast)
            assert "Loaded" in str(toast.render())
            for covered in (app.chat.status, app.chat.query_one("#input-row")):
                assert not toast.region.overlaps(covered.region), covered
            return seen, bar.total

    seen, total = run(body())
    done = [d for d, _ in seen]
    # the bar got many steps from the loading thread, each further, up to every byte
    assert len(done) > 20 and done == sorted(set(done)) and done[-1] == total
    plan = LoadPlan.open(smollm2_path, "torch", n_ctx=256)
    assert total == sum(t.nbytes for t in plan.source.tensors.values())
    assert all(text.startswith(f"loading {smollm2_path.name}: ") for _, text in seen)
    assert "preparing the weights" in seen[0][1] and "setting up" in seen[-1][1]


@pytest.mark.real
def test_a_cold_kernel_cache_shows_that_kernels_compile(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_cache, "_KERNELS", {})
    for name in [m for m in sys.modules if m.startswith("diptych_qk_")]:
        monkeypatch.delitem(sys.modules, name)
    model = diptych.load(smollm2_path, backend="torch", n_ctx=256)  # its layers keep kernels

    async def body():
        app = DiptychApp(model=model, settings=ChatSettings(temperature=0, max_tokens=1))
        async with app.run_test(size=SIZE) as pilot:
            status, seen = app.chat.status, []
            app.watch(status, "first_use", lambda what: seen.append((what, status.text)),
                      init=False)
            await send(pilot, "Hi")
            first = list(seen)
            await send(pilot, "Hi again")  # compiled now: nothing more to say
            assert seen == first and "compiling" not in status.text
            return first

    seen = run(body())
    compiled = [what for what, _ in seen if what]
    assert compiled and all(what.startswith("compiling ") and what.endswith(" for this CPU")
                            for what in compiled)
    assert all(text.startswith(f"{what} (first use only)…") for what, text in seen if what)
    assert seen[-1][0] == ""
    assert any((tmp_path / "cache" / "kernels" / "__pycache__").glob("*.nbi"))
