"""Decode and short-step speed with int8 activations (gemm_i8) against fp32 ones, in one
process on the same weights, alternating: each round feeds `--tokens` steps of random
tokens after a 32-token prompt (decode's work; which tokens does not matter), once per
setting, the order reversed every other round; the figure is
the median over rounds of the per-round ratio (a shared machine's drift cancels within a
round). Needs a CPU with AVX-512 VNNI.

    python benchmarks/bench_int8.py [--models smollm2 qwen2 gemma3] [--rounds 5]
        [--tokens 64] [--width 1] [--threads 2]

--width w: steps of w tokens (a speculative verify width) instead of one-token decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen2", "gemma3"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["DIPTYCH_THREADS"] = str(args.threads)

    import torch

    import diptych
    from diptych.backends.torch.cpu import int8_activations
    from diptych.backends.torch.cpu.qlinear import QuantLinear
    from diptych.cli.bench import random_prompt

    from bench_cpu import model_path

    if not int8_activations.ENABLED:
        raise SystemExit("int8 activations are off here (no AVX-512 VNNI, or DIPTYCH_CPU_INT8=0)")
    print(f"threads={args.threads}, {args.tokens} steps of width {args.width}, "
          f"{args.rounds} rounds; ms per step, median (range)")
    for name in args.models:
        model = diptych.load(model_path(name), n_ctx=1024, numerics="fast")
        engine = model.engine
        linears = [w for _, w in engine.weights.linears() if isinstance(w, QuantLinear) and w.int8]
        prompt = random_prompt(model.config.vocab_size, 32)
        times = {True: [], False: []}

        def run(int8: bool) -> float:
            for w in linears:
                w.int8 = int8
            engine.reset()
            engine.eval(prompt)
            steps = random_prompt(model.config.vocab_size, args.tokens * args.width)
            t0 = time.perf_counter()
            for i in range(args.tokens):
                engine.eval(steps[i * args.width:(i + 1) * args.width])
            return (time.perf_counter() - t0) / args.tokens * 1e3

        with torch.inference_mode():
            run(True), run(False)  # warm-up: kernels loaded, caches touched
            for r in range(args.rounds):
                for int8 in ((True, False) if r % 2 == 0 else (False, True)):
                    times[int8].append(run(int8))
        ratios = [f / i for i, f in zip(times[True], times[False])]
        fmt = lambda v: f"{statistics.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})"  # noqa: E731
        print(f"{name:8s} int8 {fmt(times[True])}  fp32 {fmt(times[False])}  "
              f"speed-up {fmt(ratios)}x")


if __name__ == "__main__":
    main()
