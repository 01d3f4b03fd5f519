#!/usr/bin/env python3
"""The whole-model quantizer table of BENCHMARKS.md: for one GGUF model, an F16 base made by
llama.cpp (`llama_model_quantize`, `allow_requantize`), each mix quantized from it by
llama.cpp and by diptych, then `diptych perplexity FILE TEXT --ctx CTX --kl-divergence F16`
on every file, each tool and each run in its own process. Prints the table's rows.

Needs llama-cpp-python (built without AMX, see scripts/make_reference_fixtures.py).

    python benchmarks/quantize_table.py MODEL.gguf --mixes Q4_K_M Q5_K_M --work /tmp/q
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import time
from pathlib import Path


def llama_quantize(src: Path, out: Path, mix: str) -> float:
    """llama.cpp's quantizer, 2 threads; returns the wall time."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.allow_requantize = True
    params.nthread = 2
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize failed for {mix}")
    return time.perf_counter() - start


def timed(cmd: list[str]) -> tuple[str, float, float]:
    """stdout, wall seconds and the child's user CPU seconds of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    return out, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before


def diptych(*args: str) -> list[str]:
    return [sys.executable, "-m", "diptych.cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q5_K_M"])
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "tests" /
                                          "fixtures" / "eval_corpus.txt"))
    ap.add_argument("--ctx", default="256")
    ap.add_argument("--work", default="/tmp/quantize_table")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-F16.gguf"
    if not base.exists():
        llama_quantize(Path(args.model), base, "F16")
    out, _, _ = timed(diptych("perplexity", str(base), args.text, "--ctx", args.ctx))
    print(f"F16 base: {out.strip()}", flush=True)
    print("| mix | tool | size MiB | perplexity | KL nats | same top-1 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for mix in args.mixes:
        for tool in ("llama.cpp", "diptych"):
            path = work / f"{tool}-{mix}.gguf"
            if tool == "llama.cpp":
                seconds = f"{llama_quantize(base, path, mix):.1f}"
            else:
                _, wall, user = timed(diptych("quantize", str(base), str(path), "--type", mix))
                seconds = f"{wall:.1f} ({user:.1f} user)"
            out, _, _ = timed(diptych("perplexity", str(path), args.text, "--ctx", args.ctx,
                                      "--kl-divergence", str(base)))
            ppl = re.search(r"perplexity\D*([\d.]+)", out, re.IGNORECASE)
            kl = re.search(r"KL\D*([\d.]+)", out)
            top1 = re.search(r"([\d.]+)%", out)
            print(f"| {mix} | {tool} | {path.stat().st_size / (1 << 20):.1f} | "
                  f"{ppl[1] if ppl else '?'} | {kl[1] if kl else '?'} | "
                  f"{top1[1] + '%' if top1 else '?'} | {seconds} |", flush=True)
            print(f"<!-- {out.strip()} -->", flush=True)


if __name__ == "__main__":
    main()
