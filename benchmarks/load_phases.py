"""Where `diptych.load` plus the first token spend time and memory, phase by phase (the CPU
backend; issue 14's load and memory figures).

One process per model, each phase timed and followed by the process's resident memory,
split into anonymous (the heap, repacked weights, caches) and file-backed pages (mapped
model file, shared libraries' code), both as added since the imports:

    metadata    LoadPlan.open: the GGUF header and metadata read, the plan made
    tokenizer   its tokenizer built
    weights     its engine built: weights prepared (repacked, or mapped from the copy an
                earlier load kept: runtime/sources/prepared_cache.py), caches allocated
    first token the chat template rendered, the prompt "hi" run, one token sampled
                (the first use of each CPU kernel in the process: numba loads it)

    python benchmarks/load_phases.py [--models smollm2 qwen2 gemma3] [--rounds 3]

torch and numba are imported before the clock starts, as bench_cpu.py does; a fresh
process per round, so every round pays the per-process costs a user pays.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_cpu import REGISTRY_NAMES, model_path

PHASES = ("metadata", "tokenizer", "weights", "first token")
MIB = 1 << 20


def resident() -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of this process (Linux)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) * 1024
    anon = fields["Anonymous"]
    return anon / MIB, (fields["Rss"] - anon) / MIB


def child(path: str) -> dict:
    import diptych.backends.torch.cpu.backend  # noqa: F401  torch and numba: imports
    from diptych.api import Model
    from diptych.cli.bench import peak_rss_bytes
    from diptych.load_plan import LoadPlan

    base = resident()
    out = {}

    def mark(phase: str, t0: float) -> None:
        anon, file = resident()
        out[phase] = dict(s=time.perf_counter() - t0, anon=anon - base[0], file=file - base[1])

    t = time.perf_counter()
    plan = LoadPlan.open(path, "torch", n_ctx=1024)
    mark("metadata", t)
    t = time.perf_counter()
    tokenizer = plan.tokenizer()
    mark("tokenizer", t)
    t = time.perf_counter()
    engine = plan.engine()
    mark("weights", t)
    model = Model(plan.path, plan.source, plan.config, tokenizer, engine)
    t = time.perf_counter()
    list(model.stream("hi", max_tokens=1, temperature=0))
    mark("first token", t)
    out["peak_added_mib"] = peak_rss_bytes() / MIB - sum(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(REGISTRY_NAMES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    # memory: what the process holds after the phase, added since the imports
    print(f"{'model':8s} {'phase':12s} {'seconds (rounds)':30s} {'anon MiB':>10s} "
          f"{'file MiB':>10s}")
    for name in args.models:
        path = model_path(name)
        runs = []
        for _ in range(args.rounds):
            proc = subprocess.run([sys.executable, __file__, "--child", path],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for phase in PHASES:
            secs = ", ".join(f"{r[phase]['s']:.3f}" for r in runs)
            last = runs[-1][phase]   # memory hardly varies between rounds: the last one's
            print(f"{name:8s} {phase:12s} {secs:30s} {last['anon']:10.0f} {last['file']:10.0f}")
        total = ", ".join(f"{sum(r[p]['s'] for p in PHASES):.3f}" for r in runs)
        peaks = ", ".join(f"{r['peak_added_mib']:.0f}" for r in runs)
        print(f"{name:8s} {'all':12s} {total:30s} peak added: {peaks} MiB")


if __name__ == "__main__":
    main()
