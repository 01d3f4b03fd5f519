"""What one speculative verify step of width w costs on the torch CPU backend, beside a
decode step (w = 1): `Sequence.step`, the call speculative decoding verifies a draft with,
replayed from its tape (step_tape.py) as in generation.

    python benchmarks/bench_verify_width.py MODEL.gguf [--widths 1,2,4,8,16] [--reps 8]

Each step follows a 64-token prompt and is rolled back; the widths alternate within each
round so that the machine's load hits them alike; the first round records the tapes and is
not counted. A before and after of the kernels is this script run on the two commits, one
process each, alternating. With DIPTYCH_THREADS=1 everything runs on the calling thread and
its CPU time (printed beside wall time) is the figure to compare on a busy machine: other
processes inflate wall time, not CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import diptych


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--widths", default="1,2,4,8,16")
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    model = diptych.load(args.model, backend="torch", device="cpu", n_ctx=512,
                         draft_max=max(widths))
    seq = model.engine.main
    vocab = model.engine.cfg.vocab_size
    rng = np.random.default_rng(0)
    seq.eval([int(v) for v in rng.integers(0, vocab, 64)])
    wall = {w: [] for w in widths}
    cpu = {w: [] for w in widths}
    for rep in range(args.reps + 1):
        for w in widths:
            ids = [int(v) for v in rng.integers(0, vocab, w)]
            t0, c0 = time.perf_counter(), time.thread_time()
            model.engine.backend.to_numpy(seq.step(ids))
            t1, c1 = time.perf_counter(), time.thread_time()
            seq.rollback(w)
            if rep:
                wall[w].append(t1 - t0)
                cpu[w].append(c1 - c0)
    print(f"# {args.model}  {time.strftime('%Y-%m-%d %H:%M')}  threads={torch.get_num_threads()}"
          f"  median of {args.reps}: wall ms / calling thread's CPU ms (x width {widths[0]})")
    w1, c1 = np.median(wall[widths[0]]), np.median(cpu[widths[0]])
    for w in widths:
        mw, mc = np.median(wall[w]), np.median(cpu[w])
        print(f"w={w:<3d} {mw * 1e3:7.2f} ({mw / w1:.2f}) / {mc * 1e3:7.2f} ({mc / c1:.2f})")


if __name__ == "__main__":
    sys.exit(main())
