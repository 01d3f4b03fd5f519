"""What one Engine.eval of w tokens (a speculative verify step of width w) costs on the torch
CPU backend, under two dispatch tables of the quantized linears (qlinear.DISPATCH), in one
process, alternating tables and widths so that the machine's load hits both alike.

    python benchmarks/bench_verify_width.py MODEL.gguf [--widths 1,2,4,8,16] [--reps 8]

"before" is the dispatch table that the current one replaced (measured for the previous
gemm_s, which dequantized each unit into an fp32 tile: gemv1 at M = 1, and at M = 2 for Q4_0
and Q4_1, gemm_s up to 63 rows of x, 15 for Q4_K and Q5_K, 31 for the other K-quants, then
tiles + torch.mm), run on the current kernels; "after" is qlinear.DISPATCH. The kernels' own
before and after is this script run on the two commits, one process each, alternating.
Each eval follows a 64-token prompt and is rolled back. With DIPTYCH_THREADS=1 everything
runs on the calling thread and the thread's CPU time is printed beside wall time (other
processes on the cores inflate wall time, not CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

import diptych
from diptych.backends.torch.cpu import qlinear as qlm
from diptych.quant.formats import FORMATS, QK_K


def _before(t: QT) -> tuple[tuple[int, str], ...]:
    gemm_s_from = 3 if t in (QT.Q4_0, QT.Q4_1) else 2
    tiles_from = (16 if t in (QT.Q4_K, QT.Q5_K) else 32 if FORMATS[t].block_size == QK_K
                  else 64)
    return (1, "gemv1"), (gemm_s_from, "gemm_s"), (tiles_from, "tiles")


BEFORE = {t: _before(t) for t in qlm.QUANT_TYPES}
AFTER = dict(qlm.DISPATCH)


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
    tables = {"before": BEFORE, "after": AFTER}
    wall = {(n, w): [] for n in tables for w in widths}
    cpu = {(n, w): [] for n in tables for w in widths}
    for rep in range(args.reps + 1):  # the first round warms up (kernels, buffers)
        for name, table in tables.items():
            qlm.DISPATCH.update(table)
            for w in widths:
                ids = [int(v) for v in rng.integers(0, vocab, w)]
                t0, c0 = time.perf_counter(), time.thread_time()
                model.engine.backend.to_numpy(seq.eval(ids))
                t1, c1 = time.perf_counter(), time.thread_time()
                seq.rollback(w)
                if rep:
                    wall[name, w].append(t1 - t0)
                    cpu[name, w].append(c1 - c0)
    qlm.DISPATCH.update(AFTER)
    print(f"# {args.model}  {time.strftime('%Y-%m-%d %H:%M')}  threads={torch.get_num_threads()}"
          f"  median of {args.reps}: wall ms / calling thread's CPU ms (x width 1)")
    for name in tables:
        w1, c1 = np.median(wall[name, widths[0]]), np.median(cpu[name, widths[0]])
        cells = []
        for w in widths:
            mw, mc = np.median(wall[name, w]), np.median(cpu[name, w])
            cells.append(f"w={w}: {mw * 1e3:.1f} ({mw / w1:.2f}) / {mc * 1e3:.1f} ({mc / c1:.2f})")
        print(f"{name:6s} " + " | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
