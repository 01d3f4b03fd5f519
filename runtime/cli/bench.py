"""Speed and memory measurement of a loaded model, shared by `diptych bench` and
benchmarks/bench_cpu.py so that both report the same thing."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from diptych.inference.speculative import DEFAULT_LOOKUP_NGRAM


def random_prompt(vocab_size: int, n_tokens: int) -> list[int]:
    """A fixed (seed 0) prompt of ordinary token ids, the same for every runtime compared."""
    rng = np.random.default_rng(0)
    return [int(i) for i in rng.integers(100, min(vocab_size, 30000), n_tokens)]


def measure_speed(model, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s of `prompt`, decode tok/s of `gen_tokens` greedy tokens after it),
    after a warm-up of every kernel path the timed calls take (the whole prompt, whose
    width may choose other kernels than a shorter one would, a few-token chunk, one decode
    step) so that kernel loading is not timed."""
    engine = model.engine
    engine.prefill(prompt)
    engine.eval(prompt[:4])
    engine.eval(prompt[:1])
    engine.reset()
    t0 = time.perf_counter()
    # the logits reach the host inside each timed span: lazy (MLX) and asynchronous (CUDA)
    # backends finish their work there
    logits = model.backend.to_numpy(engine.prefill(prompt))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(np.argmax(logits))
        logits = model.backend.to_numpy(engine.eval([token]))
    decode_s = time.perf_counter() - t0
    return len(prompt) / prefill_s, gen_tokens / decode_s


def measure_stream(model, prompt: list[int], gen_tokens: int, speculative: str | None,
                   lookup_ngram: int = DEFAULT_LOOKUP_NGRAM):
    """The Timings of a greedy generation of up to `gen_tokens` after `prompt`, plain
    (None) or speculative ("draft", "lookup"), from an empty cache."""
    model.engine.reset()
    pieces = list(model.stream(prompt, gen_tokens, temperature=0, speculative=speculative,
                               lookup_ngram=lookup_ngram))
    return pieces[-1].timings


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
