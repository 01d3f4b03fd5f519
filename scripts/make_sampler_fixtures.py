"""Write tests/fixtures/sampler_llama_cpp.npz: llama.cpp's own sampler chain on random logits.

Each parameter combination runs every row of one block of seeded random logits, each row
with its own token history, through llama.cpp's chain built with llama-cpp-python's
low-level API, in the order of llama.cpp's default chain: logit_bias, penalties, top-k,
top-p, min-p, temperature. The candidates the chain leaves for the draw are recorded as a
dense (rows, vocab) distribution: the softmax of their logits (what llama.cpp's `dist`
sampler draws from), in float64, zero outside the candidates.

llama-cpp-python is not a dependency of diptych; install it to regenerate:
    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" \\
        pip install --no-cache-dir llama-cpp-python
    python scripts/make_sampler_fixtures.py
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import llama_cpp as ll
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sampler_llama_cpp.npz"
ROWS, VOCAB = 4, 512
HISTORY_LENGTHS = (0, 6, 40, 120)

DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0,
                frequency_penalty=0.0, presence_penalty=0.0, penalty_last_n=64)
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)
# name -> SamplingParams keywords over DEFAULTS (seeds do not matter: only the candidates
# are compared)
CASES = {
    "defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "top_k": dict(OFF, temperature=1.0, top_k=20),
    "top_k_1": dict(OFF, temperature=1.0, top_k=1),
    "top_p": dict(OFF, temperature=1.0, top_p=0.8),
    "min_p": dict(OFF, temperature=0.7, min_p=0.1),
    "temperature_only": dict(OFF, temperature=1.7),
    "all_filters": dict(temperature=0.5, top_k=100, top_p=0.7, min_p=0.02),
    "penalties": dict(temperature=0.9, top_k=60, top_p=0.9, min_p=0.02,
                      repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5,
                      penalty_last_n=32),
    "penalty_boost_long_window": dict(OFF, temperature=1.0, repetition_penalty=0.8,
                                      penalty_last_n=256),
    "frequency": dict(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, frequency_penalty=0.7,
                      penalty_last_n=64),
    "greedy_penalties": dict(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0,
                             penalty_last_n=64),
    "logit_bias": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),  # biases below
    "bias_and_penalties": dict(temperature=1.2, top_k=0, top_p=0.95, min_p=0.03,
                               repetition_penalty=1.2, presence_penalty=0.3,
                               penalty_last_n=16),
}


def make_inputs(rng: np.random.Generator):
    logits = (rng.standard_normal((ROWS, VOCAB)) * 2.5).astype(np.float32)
    histories = []
    for row, n in zip(logits, HISTORY_LENGTHS):
        likely = np.argsort(-row)[:30]  # repeats of likely tokens, so penalties matter
        pool = np.concatenate([likely, rng.integers(0, VOCAB, 10)])
        histories.append([int(t) for t in rng.choice(pool, n)])
    return logits, histories


def biases(logits: np.ndarray) -> list[tuple[int, float]]:
    """Raise, lower and ban some of the first row's likely tokens (ids shared by all rows)."""
    top = np.argsort(-logits[0])[:6]
    return [(int(top[0]), -math.inf), (int(top[1]), -2.0), (int(top[5]), 3.0), (7, 1.5)]


def run_chain(row: np.ndarray, history: list[int], p: dict) -> np.ndarray:
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    samplers = []
    if p.get("logit_bias"):
        arr = (ll.llama_logit_bias * len(p["logit_bias"]))()
        for slot, (token, bias) in zip(arr, p["logit_bias"]):
            slot.token, slot.bias = token, bias
        samplers.append(ll.llama_sampler_init_logit_bias(VOCAB, len(arr), arr))
    samplers += [
        ll.llama_sampler_init_penalties(VOCAB, p["penalty_last_n"], p["repetition_penalty"],
                                        p["frequency_penalty"], p["presence_penalty"]),
        ll.llama_sampler_init_top_k(p["top_k"]),
        ll.llama_sampler_init_top_p(p["top_p"], 1),
        ll.llama_sampler_init_min_p(p["min_p"], 1),
        ll.llama_sampler_init_temp(p["temperature"]),
    ]
    for s in samplers:
        ll.llama_sampler_chain_add(chain, s)  # the chain owns and frees them
    for token in history:
        ll.llama_sampler_accept(chain, token)

    data = (ll.llama_token_data * VOCAB)()
    for i, v in enumerate(row):
        data[i].id, data[i].logit, data[i].p = i, float(v), 0.0
    cur = ll.llama_token_data_array(data=data, size=VOCAB, selected=-1, sorted=False)
    ll.llama_sampler_apply(chain, ctypes.byref(cur))
    ids = np.array([data[i].id for i in range(cur.size)])
    kept = np.array([data[i].logit for i in range(cur.size)], np.float64)
    ll.llama_sampler_free(chain)

    live = np.isfinite(kept)  # temperature 0 leaves the others in place at -inf
    ids, kept = ids[live], kept[live]
    dist = np.zeros(VOCAB)
    dist[ids] = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
    return dist


def main() -> None:
    logits, histories = make_inputs(np.random.default_rng(11))
    cases = []
    for name, params in CASES.items():
        params = {**DEFAULTS, **params}
        if "bias" in name:
            params["logit_bias"] = biases(logits)
        cases.append(dict(name=name, params=params))
    probs = np.stack([[run_chain(row, hist, c["params"]) for row, hist in zip(logits, histories)]
                      for c in cases])
    lengths = np.array([len(h) for h in histories])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, logits=logits, probs=probs, history_lengths=lengths,
                        histories=np.concatenate(histories).astype(np.int32),
                        cases=np.array(json.dumps(cases)),
                        llama_cpp_python=np.array(ll.__version__))
    print(f"wrote {OUT}: {len(cases)} cases x {ROWS} rows x {VOCAB} tokens")
    for c, p in zip(cases, probs):
        print(f"  {c['name']:28s} candidates per row {[int((r > 0).sum()) for r in p]}")


if __name__ == "__main__":
    main()
