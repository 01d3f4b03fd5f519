"""The sampler's share of a decode step on the CPU, at each model's vocabulary.

For each model and sampling setting, one generation of `--tokens` tokens after a short
chat prompt (the model's template; an instruct model asked for plain text may stop at
once); `Sampler.sample` is timed around each call, and its share is the sampler's time
over the decode time (`Timings.decode_s`, which includes it) of the tokens after the first.
Settings: llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), those
plus a repetition penalty of 1.1, greedy, and greedy with the penalty.

    python benchmarks/bench_sampling.py [--models qwen2 gemma3] [--threads 1] [--tokens 48]
"""

from __future__ import annotations

import argparse
import os
import time

SETTINGS = {
    "default": {},
    "default + penalty 1.1": {"repetition_penalty": 1.1},
    "greedy": {"temperature": 0.0},
    "greedy + penalty 1.1": {"temperature": 0.0, "repetition_penalty": 1.1},
}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen2", "gemma3"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    os.environ["DIPTYCH_THREADS"] = str(args.threads)
    import diptych
    from diptych.inference.sampler import Sampler

    from bench_cpu import model_path

    spent = []
    plain_sample = Sampler.sample

    def timed_sample(self, *a, **kw):
        start = time.perf_counter()
        out = plain_sample(self, *a, **kw)
        spent.append(time.perf_counter() - start)
        return out

    Sampler.sample = timed_sample
    print(f"threads {args.threads}, {args.tokens} tokens; sampler ms per token, share of "
          f"the decode step")
    for name in args.models:
        model = diptych.load(model_path(name), backend="torch", n_ctx=1024)
        print(f"{name} (vocabulary {model.config.vocab_size:,})")
        prompt = model.chat_prompt([{"role": "user", "content": PROMPT}])
        for setting, params in SETTINGS.items():
            model.generate(prompt, 4, seed=0, **SETTINGS["default"])  # warm
            spent.clear()
            timings = None
            for piece in model.stream(prompt, args.tokens, seed=0, **params):
                timings = piece.timings
            sampler_s = sum(spent[1:])  # the first token is drawn from the prefill's logits
            step = timings.decode_s / max(1, timings.generated_tokens - 1)
            share = sampler_s / timings.decode_s if timings.decode_s else 0.0
            print(f"  {setting:24s} {sampler_s / max(1, len(spent) - 1) * 1e3:6.2f} ms "
                  f"of {step * 1e3:6.1f} ms  {share:6.1%}")


if __name__ == "__main__":
    main()
