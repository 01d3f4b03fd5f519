"""`diptych chat` with speculative decoding and an adapter: the command line's options reach
the real app (Textual's Pilot, the real default model), and bad ones are one-line errors."""

import numpy as np
import pytest

from diptych.cli.chat import app_options
from diptych.cli.main import build_parser, main
from diptych.load_plan import read_config
from diptych.model.adapter_files import LoraAdapter, write_adapter
from diptych.quant.gguf_file import GGUFFile
from diptych.tui.app import DiptychApp

from .conftest import run
from .test_chat_app import SIZE, send, transcript

PROMPT = "Repeat: one two three four one two three four"


def small_adapter(model_path, folder):
    """A random rank-2 adapter on one layer's q_proj, written as a finetune run writes it."""
    cfg = read_config(GGUFFile(model_path))
    rng = np.random.default_rng(0)
    pair = (rng.normal(0, 0.02, (2, cfg.d_model)).astype(np.float32),
            rng.normal(0, 0.02, (cfg.n_heads * cfg.head_dim, 2)).astype(np.float32))
    write_adapter(LoraAdapter({(3, "q_proj"): pair}, alpha=2.0, rank=2), cfg, folder)
    return folder


def test_bad_options_are_one_line_errors(tmp_path, capsys, smollm2_path):
    for argv in (["chat", "--draft", str(tmp_path / "none.gguf")],
                 ["chat", "--adapter", str(tmp_path / "no-adapter")],
                 ["chat", "--lookup", "--draft-max", "2", "--top-p", "0"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("diptych: error:") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--lookup", "--draft", str(smollm2_path)])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.real
def test_lookup_and_adapter_from_the_command_line(smollm2_path, tmp_path):
    adapter = small_adapter(smollm2_path, tmp_path / "adapter")
    args = build_parser().parse_args(
        ["chat", str(smollm2_path), "--lookup", "--draft-max", "3", "--adapter", str(adapter),
         "--temperature", "0", "--max-tokens", "12", "--n-ctx", "256", "--backend", "torch"])
    options = app_options(args)
    assert options["settings"].speculative == "lookup" and options["draft_max"] == 3

    async def body():
        app = DiptychApp(options.pop("source"), **options)
        async with app.run_test(size=SIZE) as pilot:
            while app.model is None:
                await pilot.pause(0.1)
            await send(pilot, PROMPT)
            return app.model, transcript(app)[-1][1], app.chat.status.text

    model, reply, status = run(body())
    assert model.adapter == str(adapter) and model.engine.max_rollback == 3
    assert reply and f"+ {adapter.name}" in status
    assert "accepted" in status and "tok/pass" in status
