"""Load plus the first token, diptych (torch backend, CPU) beside llama.cpp: issue 14's load
figure alone, without bench_cpu.py's speed runs.

Each runtime in its own process per round, the sides alternating, timed as bench_cpu.py
times its "first s" (`first_token_diptych`, `first_token_llama_cpp`: torch and numba, or
llama_cpp, imported before the clock; the constructor, then the first token of an 8-token
prompt). Also the peak resident memory the load and the pass added (ru_maxrss minus the
RSS after the imports).

    python benchmarks/bench_load.py [--models smollm2 qwen2 gemma3] [--rounds 5]
        [--threads 2] [--numba-registries] [--repack]

--numba-registries adds a side that loads the cached kernels as numba itself does, after
refreshing its compiler's registries (what backends/torch/cpu/cached_njit.py spares).
--repack adds a side that repacks the weights as a first load does, instead of mapping the
copy kept by an earlier load (runtime/sources/prepared_cache.py; DIPTYCH_REPACK_CACHE_GB=0).
Before the rounds, one load of each model leaves that copy in the cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_cpu import REGISTRY_NAMES, first_token_diptych, first_token_llama_cpp, model_path
from load_phases import MIB, resident

from diptych.cli.bench import peak_rss_bytes


def child(side: str, model: str, threads: int) -> dict:
    path = model_path(model)
    if side == "llama.cpp":
        import llama_cpp  # noqa: F401  imports, not load
    else:
        import diptych.backends.torch.cpu.backend  # noqa: F401  torch and numba: imports

        if side == "diptych+registries":
            from numba.core.caching import FunctionCache

            from diptych.backends.torch.cpu import cached_njit

            cached_njit._CacheWithoutRegistries.load_overload = FunctionCache.load_overload
    base_mib = sum(resident())
    first = first_token_llama_cpp if side == "llama.cpp" else first_token_diptych
    seconds = first(path, threads)[3]
    return dict(s=seconds, added_mib=peak_rss_bytes() / MIB - base_mib)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(REGISTRY_NAMES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numba-registries", action="store_true")
    ap.add_argument("--repack", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return
    sides = ["diptych"] + (["diptych+registries"] if args.numba_registries else []) \
        + (["diptych, repacking"] if args.repack else []) + ["llama.cpp"]

    def run(side: str, model: str) -> dict:
        env = dict(os.environ, **({"DIPTYCH_REPACK_CACHE_GB": "0"} if "repacking" in side
                                  else {}))
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                              "--child", side, model], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for model in args.models:
        model_path(model)  # downloaded before the clock
        run("diptych", model)   # the repacked copy kept, the kernels compiled
        runs = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                runs[side].append(run(side, model))
        llama = statistics.median(r["s"] for r in runs["llama.cpp"])
        for side, rs in runs.items():
            times = [r["s"] for r in rs]
            s = statistics.median(times)
            print(f"{model:8s} {side:19s} load + first token {s:.3f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)}) = {s / llama:.2f}x llama.cpp's, "
                  f"peak added {statistics.median(r['added_mib'] for r in rs):.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
