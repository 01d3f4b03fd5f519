"""CPU decode attention: the kernels over the fp16 cache (backends/torch/cpu/
decode_attention.py: the cache write, then the serial kernel below MIN_KEYS visible slots
and the thread-pool one from there) against torch indexing and SDPA over an fp32 copy of
the cache (TorchBackend.attention), at a given context length, in one process, alternating.

Per model and context: a random prompt of that many tokens is prefilled once; then, for
each round and each path, `--tokens` greedy tokens are decoded and the cache trimmed back
to the prompt. "token" is the decode time per token, "layer" the attention of layer 0 on
the inputs it had in a decode step (the cache write excluded), each as CPU time of the
whole process (all threads) and wall time, medians over the rounds.

    python benchmarks/bench_decode_attention.py [--models smollm2 qwen2] [--contexts 256 2048]
        [--tokens 32] [--rounds 3] [--threads 2]
    python benchmarks/bench_decode_attention.py --widths [--threads 1]
    python benchmarks/bench_decode_attention.py --min-keys 1024 128 [--models ...]
        [--contexts 16 256 512]

The paths are compared through the graph (DIPTYCH_CPU_TAPE=0: a replayed step would take
the kernel path it was recorded with).
--widths: the two paths alone on random fp16 caches of the real models' head shapes, at
1 to 9 query positions (causal): where the kernel stops paying (decode_attention.MAX_QUERIES).
--min-keys: greedy decode tok/s of the whole model (replayed steps, as users run them) after
a prompt of each context, with each value of decode_attention.MIN_KEYS (from how many
visible keys attention runs on the thread pool) in turn, the values alternating per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bench_cpu import model_path
from diptych.cli.bench import random_prompt

LAYER_CALLS = 200


def _timed(fn, n: int) -> tuple[float, float]:
    """(CPU seconds of the process, wall seconds) per call of fn, over n calls."""
    c, w = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c) / n, (time.perf_counter() - w) / n


def _kernel_attend(q, kc, vc, spec, view, scale):
    """decode_attention.attend over torch cache buffers (through their `stored` views), for
    the view's step: q's T positions ending at its last visible key."""
    import torch

    from diptych.backends.torch.cpu import decode_attention

    stored = decode_attention.stored
    n = q.shape[1]
    last = int(view.key_pos.max()) + 1 if view.key_pos is not None else view.n_keys
    positions = torch.arange(last - n, last)[None]
    return decode_attention.attend(q, stored(kc), None if vc is None else stored(vc), spec,
                                   positions, view.key_pos, scale)


def bench_min_keys(name: str, contexts: list[int], values: list[int], tokens: int,
                   rounds: int) -> None:
    import diptych
    from diptych.backends.torch.cpu import decode_attention
    from diptych.cli.bench import measure_speed

    model = diptych.load(model_path(name), n_ctx=max(contexts) + tokens + 8)
    for ctx in contexts:
        prompt = random_prompt(model.config.vocab_size, ctx)
        speeds = {v: [] for v in values}
        for _ in range(rounds):
            for v in values:
                decode_attention.MIN_KEYS = v
                model.engine.reset()
                speeds[v].append(measure_speed(model, prompt, tokens)[1])
        print(f"{name:8s} {ctx:6d} " + " ".join(
            f"{statistics.median(speeds[v]):12.1f}" for v in values))


def bench_model(name: str, contexts: list[int], tokens: int, rounds: int) -> None:
    import diptych
    from diptych.backends.torch.backend import TorchBackend
    from diptych.backends.torch.cpu import decode_attention

    model = diptych.load(model_path(name), n_ctx=max(contexts) + tokens + 8)
    engine, be = model.engine, model.backend
    kernel_supports = decode_attention.supports
    paths = {"sdpa": lambda *_: False, "kernel": kernel_supports}
    for ctx in contexts:
        prompt = random_prompt(model.config.vocab_size, ctx)
        engine.reset()
        logits = be.to_numpy(engine.prefill(prompt))
        first = int(np.argmax(logits))
        engine.eval([first])  # every kernel compiled or loaded before timing
        engine.keep_prefix(prompt)

        captured = []
        layer0 = be.attend_cache

        def capture(*args):
            if not captured:
                captured.extend(a.clone() if hasattr(a, "clone") else a for a in args)
            return layer0(*args)

        be.attend_cache = capture  # reached on the SDPA path
        decode_attention.supports = paths["sdpa"]
        engine.eval([first])
        decode_attention.supports = kernel_supports
        del be.attend_cache
        engine.keep_prefix(prompt)

        token_s = {p: [] for p in paths}
        layer_s = {p: [] for p in paths}
        layer_fn = {"sdpa": lambda: TorchBackend.attend_cache(be, *captured),
                    "kernel": lambda: _kernel_attend(*captured)}
        for _ in range(rounds):
            for path, supports in paths.items():
                decode_attention.supports = supports
                token = first

                def step():
                    nonlocal token
                    token = int(np.argmax(be.to_numpy(engine.eval([token]))))

                token_s[path].append(_timed(step, tokens))
                engine.keep_prefix(prompt)
                with be.inference():
                    layer_s[path].append(_timed(layer_fn[path], LAYER_CALLS))
        decode_attention.supports = kernel_supports
        for path in paths:
            tc, tw = (statistics.median(x) * 1e3 for x in zip(*token_s[path]))
            lc, lw = (statistics.median(x) * 1e6 for x in zip(*layer_s[path]))
            print(f"{name:8s} {ctx:6d} {path:7s} {tc:9.2f} {tw:9.2f} {lc:10.1f} {lw:10.1f}")
        old, new = (statistics.median(c for c, _ in token_s[p]) for p in paths)
        lold, lnew = (statistics.median(c for c, _ in layer_s[p]) for p in paths)
        print(f"{name:8s} {ctx:6d} {'ratio':7s} {old / new:9.2f} {'':9s} {lold / lnew:10.2f}"
              f"   (sdpa / kernel, CPU time)")


# (name, heads, KV heads, head dim) of SmolLM2-135M, Qwen2.5-0.5B, Gemma-3-270M
SHAPES = [("smollm2", 9, 3, 64), ("qwen2", 14, 2, 64), ("gemma3", 4, 1, 256)]


def bench_widths(rounds: int) -> None:
    import torch

    from diptych.backends import select
    from diptych.backends.base import CacheView, LayerCacheSpec
    from diptych.backends.torch.backend import TorchBackend
    from diptych.backends.torch.cpu import decode_attention
    from diptych.inference.slots import visible

    be = select("torch", "cpu")
    print(f"{'shape':8s} {'keys':>5s} {'T':>2s} {'sdpa cpu us':>11s} {'kernel cpu us':>13s} "
          f"{'ratio':>6s}")
    for name, heads, n_kv, d in SHAPES:
        for n_keys in (256, 2048):
            spec = LayerCacheSpec(n_keys, n_kv, d)
            kc = torch.randn(1, n_kv, n_keys, d).half()
            vc = torch.randn(1, n_kv, n_keys, d).half()
            for n in (1, 2, 3, 4, 5, 9):
                q = torch.randn(1, n, heads, d)
                view = CacheView(None, None, *visible(spec, n_keys - n, n_keys))
                args = (q, kc, vc, spec, view, d ** -0.5)
                fns = {"sdpa": lambda: TorchBackend.attend_cache(be, *args),
                       "kernel": lambda: _kernel_attend(*args)}
                cpu = {p: [] for p in fns}
                for _ in range(rounds):
                    for path, fn in fns.items():
                        fn()
                        cpu[path].append(_timed(fn, LAYER_CALLS)[0] * 1e6)
                old, new = statistics.median(cpu["sdpa"]), statistics.median(cpu["kernel"])
                print(f"{name:8s} {n_keys:5d} {n:2d} {old:11.1f} {new:13.1f} {old / new:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen2"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[256, 2048])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", action="store_true")
    ap.add_argument("--min-keys", nargs="+", type=int)
    args = ap.parse_args()
    os.environ["DIPTYCH_THREADS"] = str(args.threads)
    if args.widths:
        bench_widths(args.rounds)
        return
    if args.min_keys:
        print(f"threads={args.threads}, decode tok/s of {args.tokens} greedy tokens after "
              f"the context, median of {args.rounds} rounds, by MIN_KEYS")
        print(f"{'model':8s} {'ctx':>6s} " + " ".join(f"{v:>12d}" for v in args.min_keys))
        for name in args.models:
            bench_min_keys(name, args.contexts, args.min_keys, args.tokens, args.rounds)
        return
    os.environ["DIPTYCH_CPU_TAPE"] = "0"
    print(f"threads={args.threads}, {args.tokens} tokens per round, {args.rounds} rounds, "
          f"medians; token: ms per decoded token, layer: us per layer-0 attention")
    print(f"{'model':8s} {'ctx':>6s} {'path':7s} {'token cpu':>9s} {'wall':>9s} "
          f"{'layer cpu':>10s} {'wall':>10s}")
    for name in args.models:
        bench_model(name, args.contexts, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
