"""`diptych chat` with speculative decoding and an adapter: the options become the app's
(test_speculative_settings runs the app from them), and bad ones are one-line errors."""

import numpy as np
import pytest

from diptych.cli.chat import app_options
from diptych.cli.main import build_parser, main
from diptych.inference.speculative import DEFAULT_DRAFT_MAX
from diptych.load_plan import read_config
from diptych.model.adapter_files import LoraAdapter, write_adapter
from diptych.quant.gguf_file import GGUFFile


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


def test_options_become_the_apps(smollm2_path, tmp_path):
    parse = build_parser().parse_args
    options = app_options(parse(["chat", str(smollm2_path), "--lookup", "--draft-max", "3",
                                 "--lookup-ngram", "2", "--adapter", str(tmp_path),
                                 "--temperature", "0"]))
    assert (options["source"], options["adapter"], options["draft_max"]) == (
        smollm2_path, str(tmp_path), 3)
    settings = options["settings"]
    assert (settings.speculative, settings.draft, settings.temperature) == ("lookup", None, 0)
    assert settings.generation_kwargs()["lookup_ngram"] == 2
    options = app_options(parse(["chat", "--draft", str(smollm2_path)]))
    assert options["settings"].speculative == "draft"
    assert options["settings"].draft == str(smollm2_path)
    assert options["draft_max"] == DEFAULT_DRAFT_MAX and options["adapter"] is None
