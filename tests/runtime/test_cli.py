"""The `diptych` command line, run as a user runs it (a subprocess) on the default model."""

import subprocess
import sys

import pytest


def diptych(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "diptych.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def default_model(smollm2_path):
    return smollm2_path


def test_info_describes_the_model():
    out = diptych("info")
    assert out.returncode == 0, out.stderr
    for text in ("llama", "134.5 M", "8192", "Q4_1", "Q8_0", "KV cache", "attn_q.weight",
                 "layouts on the torch", "model           SmolLM2-135M-Instruct.Q4_1",
                 "Smollm2 135M 8k Lc100K Mix1 Ep2 (from the file's metadata)"):
        assert text in out.stdout
    out = diptych("info", "--backend", "mlx")
    assert out.returncode == 0, out.stderr
    assert "Q4_1 -> affine 4-bit g32" in out.stdout
    out = diptych("info", "--backend", "torch", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "layouts on the torch (cpu) backend" in out.stdout


def test_run_streams_an_answer():
    out = diptych("run", "--raw", "The capital of France is", "--max-tokens", "8",
                  "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "tok/s" in out.stderr


@pytest.mark.parametrize("args", [["--debug", "info", "/nowhere/m.gguf"],
                                  ["info", "/nowhere/m.gguf", "--debug"]])
def test_debug_before_or_after_the_command_shows_the_traceback(args):
    out = diptych(*args)
    assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr


def test_options_between_model_and_prompt(default_model):
    # stdout and stderr into one pipe: the reply ends its line before the figures come
    out = subprocess.run([sys.executable, "-m", "diptych.cli", "run", str(default_model),
                          "--max-tokens", "8", "--raw", "The capital of France is",
                          "--temperature", "0"], stdout=subprocess.PIPE, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout
    reply, figures = out.stdout.rstrip("\n").rsplit("\n", 1)
    assert "Paris" in reply and figures.startswith("[") and "tok/s" in figures


def test_bad_input_is_one_line_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    for args in (["info", str(bad)], ["run", str(tmp_path / "none.gguf"), "hi"],
                 ["run", "--temperature", "-1", "hi"], ["chat", str(tmp_path / "none.gguf")],
                 ["chat", "--top-p", "0"], ["chat", "--backend", "nope"],
                 ["info", "--backend", "torch", "--device", "gpu"],
                 ["run", "--device", "metal", "hi"]):
        out = diptych(*args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith("diptych: error:") and "Traceback" not in out.stderr


def test_bench_prints_speeds_and_memory():
    out = diptych("bench", "--prompt-tokens", "32", "--gen-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "prefill" in out.stdout and "decode" in out.stdout and "peak RSS" in out.stdout
    assert "model    SmolLM2-135M-Instruct.Q4_1 on torch" in out.stdout


def test_speculative_run_and_bench_report_acceptance(default_model):
    """Prompt lookup: the same greedy text as plain decoding, and the drafts' acceptance;
    `info --draft` counts the draft's weights and cache."""
    prompt = "a b c d e f g h a b c d e f g h a b c d"
    plain = diptych("run", "--raw", prompt, "--max-tokens", "12", "--temperature", "0")
    looked = diptych("run", "--raw", prompt, "--max-tokens", "12", "--temperature", "0",
                     "--lookup", "--draft-max", "4", "--lookup-ngram", "2")
    assert looked.returncode == 0, looked.stderr
    assert looked.stdout == plain.stdout and "drafts accepted" in looked.stderr
    out = diptych("bench", "--prompt-tokens", "16", "--gen-tokens", "8", "--lookup")
    assert out.returncode == 0, out.stderr
    assert "tok/s plain" in out.stdout and "tok/s lookup" in out.stdout
    out = diptych("info", "--draft", str(default_model))
    assert out.returncode == 0, out.stderr
    assert "draft weights" in out.stdout and "draft KV" in out.stdout


@pytest.mark.parametrize("args,says", [
    (["--lookup", "--draft", "x.gguf"], "not allowed with"),
    (["--lookup", "--lookup-ngram", "0"], "--lookup-ngram"),
])
def test_speculative_usage_errors(args, says, capsys):
    """Caught while parsing, before anything loads (so in this process)."""
    from diptych.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "hi", *args])
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_run_says_what_it_compiles_on_first_use(default_model, monkeypatch, capsys):
    """A kernel missing from the on-disk cache is announced on stderr, with its time. (In this
    process, so that the kernels can pretend to be missing without a 15 s compile.)"""
    from diptych.backends.torch.cpu import kernel_cache
    from diptych.cli.main import main

    monkeypatch.setattr(kernel_cache, "_KERNELS", {})
    monkeypatch.setattr(kernel_cache, "_compile_listener", None)
    monkeypatch.setattr(kernel_cache, "is_cached", lambda kind, t: False)
    assert main(["run", str(default_model), "hi", "--raw", "--max-tokens", "1",
                 "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert "compiling the Q4_1 gemm_s kernel for this CPU" in err
    assert "compiling the Q8_0 deq_rows kernel" in err and "  done in " in err


def no_traceback(out):
    return "Traceback" not in out.stderr and "Traceback" not in out.stdout


def test_version_and_bare_command_print_help():
    from diptych import __version__

    out = diptych("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"diptych {__version__}"
    out = diptych()
    assert out.returncode == 0 and "usage: diptych" in out.stdout and "run" in out.stdout


def test_help_documents_sampling_defaults_and_stop():
    out = diptych("run", "--help")
    assert out.returncode == 0
    help_text = " ".join(out.stdout.split())
    for text in ("--stop TEXT", "(default: 512)", "0 = greedy (default: 0.8)", "(default: 40)",
                 "(default: 0.95)", "general.sampling", "--verbose", "echo PROMPT | diptych run"):
        assert text in help_text, text


@pytest.mark.parametrize("args", [["run"], ["run", "/nowhere/model.gguf"],
                                  ["bench", "--prompt-tokens", "0"], ["run", "--max-tokens", "0", "hi"],
                                  ["info", "--n-ctx", "x"], ["frobnicate"]])
def test_usage_errors_exit_2_without_traceback(args):
    out = diptych(*args, stdin="")
    assert out.returncode == 2, (args, out.stderr)
    assert "error:" in out.stderr and no_traceback(out)


def test_piped_prompt_and_verbose_settings():
    out = diptych("run", "--max-tokens", "16", "--verbose", stdin="What is the capital of France?\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    # the embedded model's own defaults are in effect and shown
    assert "SmolLM2-135M-Instruct.Q4_1" in out.stderr and "temperature 0," in out.stderr
    assert "repeat penalty 1.1" in out.stderr and "max tokens 16" in out.stderr


def test_closed_pipe_ends_quietly():
    out = subprocess.run(f"{sys.executable} -m diptych.cli run --raw 'Once upon a time' "
                         "--max-tokens 64 | head -c1", shell=True, capture_output=True, text=True,
                         timeout=600)
    assert len(out.stdout) == 1 and no_traceback(out), out.stderr
