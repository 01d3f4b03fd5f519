"""Benchmark diptych's CPU quantized linear (backends/torch/qlinear.py).

For each GGML type and weight shape (N out, K in) it times QuantLinear.forward on x (M, K) and
prints the GGUF weight bytes read per second (GB/s = bytes of the quantized weight / time: for
M = 1 the kernel reads each byte once, so this is the effective memory bandwidth), GFLOP/s
(2*M*N*K / time), and the same product done by torch on the dequantized fp32 weight (the
"HF transformers on a dequantized GGUF" peer; it reads 4 bytes per weight).

    python benchmarks/bench_qlinear.py                       # all types, default shapes, M=1,256
    python benchmarks/bench_qlinear.py --types Q4_1,Q8_0 --m 1,4,16,64,256
    python benchmarks/bench_qlinear.py --smollm2             # one SmolLM2-135M decode step
    python benchmarks/bench_qlinear.py --crossover --threads 2   # each path per (type, M)
    python benchmarks/bench_qlinear.py --crossover --int8 --threads 2   # numerics "fast"

Weights are random GGML blocks with finite fp16 scales (throughput does not depend on values).
Times are the minimum over repetitions (median in brackets) of each configuration run in its
own loop; on a shared machine run it twice and compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from diptych.backends.torch.cpu import kernel_cache
from diptych.backends.torch.cpu.threads import set_numba_threads
from diptych.backends.torch.cpu import qlinear as qlm
from diptych.backends.torch.cpu.kernel_source import I8_TYPES
from diptych.backends.torch.cpu.qlinear import QuantLinear
from diptych.quant import QuantTensor

# SmolLM2-135M: FFN (1536, 576), (576, 1536), tied LM head (49152, 576);
# Qwen2.5-0.5B: FFN (4864, 896), (896, 4864), tied LM head (151936, 896)
DEFAULT_SHAPES = [(1536, 576), (576, 1536), (49152, 576), (4864, 896), (896, 4864), (151936, 896)]
DEFAULT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K", "F16", "BF16", "F32"]

# byte offsets of the fp16 scale fields inside one block (random bytes there could be NaN/inf)
F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.IQ4_NL: [0], QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2],
              QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_tensor(t: QT, n: int, k: int, rng: np.random.Generator) -> QuantTensor:
    """A QuantTensor of random blocks of type t with finite fp16 scales."""
    if t == QT.F32:
        data = rng.standard_normal((n, k), dtype=np.float32).view(np.uint8)
    elif t == QT.F16:
        data = rng.standard_normal((n, k), dtype=np.float32).astype(np.float16).view(np.uint8)
    elif t == QT.BF16:
        bits = rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16
        data = bits.astype(np.uint16).view(np.uint8)
    else:
        bs, ts = GGML_QUANT_SIZES[t]
        nb = k // bs
        data = rng.integers(0, 256, (n, nb, ts), dtype=np.uint8)
        for off in F16_FIELDS[t]:
            h = (rng.standard_normal((n, nb), dtype=np.float32) * 0.02).astype(np.float16)
            data[:, :, off:off + 2] = h.view(np.uint8).reshape(n, nb, 2)
        data = data.reshape(n, nb * ts)
    return QuantTensor("bench", t, (n, k), np.ascontiguousarray(data).reshape(n, -1))


def timeit(fn, budget: float, max_reps: int = 1000) -> tuple[float, float]:
    """(min, median) seconds of fn() over repetitions filling about `budget` seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(budget / max(one, 1e-7))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def path_name(ql: QuantLinear, m: int) -> str:
    return qlm.path_for(ql.ggml_type, m) if ql.quantized else "torch"


def bench_shapes(args) -> None:
    rng = np.random.default_rng(0)
    print(f"{'type':7s} {'N x K':>13s} {'M':>4s} {'path':8s} {'time us':>20s} {'GB/s':>7s} "
          f"{'GFLOP/s':>8s} | {'fp32 torch us':>14s} {'GFLOP/s':>8s} {'speedup':>7s}")
    for tname in args.types:
        t = QT[tname]
        for n, k in args.shapes:
            if t not in (QT.F32, QT.F16, QT.BF16) and k % GGML_QUANT_SIZES[t][0]:
                print(f"{tname:7s} {n:>6d} x {k:<5d} (K not a multiple of the block size: llama.cpp "
                      f"stores such rows in a fallback type)")
                continue
            qt = random_tensor(t, n, k, rng)
            ql = QuantLinear.from_quant_tensor(qt)
            gguf_bytes = qt.nbytes
            w32 = ql.dequantize() if args.fp32 else None
            for m in args.m:
                x = torch.randn(m, k)
                flops = 2.0 * m * n * k
                budget = args.budget
                tq, tq_med = timeit(lambda: ql.forward(x), budget)
                line = (f"{tname:7s} {n:>6d} x {k:<5d} {m:>4d} {path_name(ql, m):8s} "
                        f"{tq * 1e6:>10.1f} [{tq_med * 1e6:>8.1f}] {gguf_bytes / tq / 1e9:>7.2f} "
                        f"{flops / tq / 1e9:>8.1f}")
                if w32 is not None:
                    tf, _ = timeit(lambda: x @ w32.T, budget)
                    line += f" | {tf * 1e6:>14.1f} {flops / tf / 1e9:>8.1f} {tf / tq:>6.2f}x"
                print(line, flush=True)
            del w32, ql, qt


# The real models' linear shapes, both orientations: SmolLM2-135M FFN, Qwen2.5-0.5B FFN,
# Qwen2.5-1.5B FFN (K-quants only where K is a multiple of 256)
CROSSOVER_SHAPES = [(1536, 576), (576, 1536), (4864, 896), (896, 4864), (8960, 1536), (1536, 8960)]
CROSSOVER_M = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 17, 20, 24, 32]
CROSSOVER_M_I8 = [16, 32, 48, 64, 96, 128, 160, 192, 256]


def bench_crossover(args) -> None:
    """Each path of qlinear.PATHS (gemv1 once per row, gemm_s, tiles + torch.mm) per type,
    shape and M, timed in rounds that alternate the paths (so the machine's load hits all
    alike); min (median) over the rounds. Then, per type and M, each path's cost relative to
    the best path of each shape, averaged over the shapes, and the dispatch that follows.
    On one thread every path runs on the calling thread, so the clock is that thread's CPU
    time, which other processes on the cores do not inflate; on more, wall time.
    --int8: the paths of weights prepared for numerics "fast" in inference steps (gemm_i8,
    and tiles_bf16, or the fp32 tiles without qlinear.BF16_NATIVE), from M = 16 to 256."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    print(f"# clock: {clock.__name__}")
    rng = np.random.default_rng(0)
    ms = args.m if args.m != [1, 256] else CROSSOVER_M_I8 if args.int8 else CROSSOVER_M
    shapes = args.shapes if args.shapes_given else CROSSOVER_SHAPES
    paths = ("gemm_i8", "tiles_bf16" if qlm.BF16_NATIVE else "tiles") if args.int8 else qlm.PATHS
    print(f"{'type':7s} {'N x K':>13s} {'M':>3s} " + " ".join(f"{p + ' us':>19s}" for p in paths)
          + "  best   (min [median] over alternating rounds)")
    summary = {}
    for tname in args.types:
        t = QT[tname]
        if t in (QT.F32, QT.F16, QT.BF16) or (args.int8 and t not in I8_TYPES):
            continue
        rel = {m: {p: [] for p in paths} for m in ms}
        for n, k in shapes:
            if k % GGML_QUANT_SIZES[t][0]:
                continue
            ql = QuantLinear.from_quant_tensor(random_tensor(t, n, k, rng))
            ql.int8 = args.int8
            for m in ms:
                xn = rng.standard_normal((m, k), dtype=np.float32)
                for p in paths:
                    ql._run(p, xn)  # warm up (kernel lookup, buffers)
                ts = {p: [] for p in paths}
                t_end = time.perf_counter() + args.budget
                while len(ts[paths[0]]) < args.rounds or (
                        time.perf_counter() < t_end and len(ts[paths[0]]) < 10 * args.rounds):
                    for p in paths:
                        t0 = clock()
                        ql._run(p, xn)
                        ts[p].append(clock() - t0)
                best_t = min(min(v) for v in ts.values())
                cells = []
                for p in paths:
                    rel[m][p].append(min(ts[p]) / best_t)
                    cells.append(f"{min(ts[p]) * 1e6:>9.0f} [{np.median(ts[p]) * 1e6:>7.0f}]")
                best = min(paths, key=lambda p: min(ts[p]))
                print(f"{tname:7s} {n:>6d} x {k:<5d} {m:>3d} " + " ".join(cells) + f"  {best}",
                      flush=True)
            del ql
        if not rel[ms[0]][paths[0]]:   # every shape's K is off the type's block size
            print(f"# {tname}: no shape with K a multiple of {GGML_QUANT_SIZES[t][0]}")
            continue
        summary[tname] = {m: {p: float(np.mean(v)) for p, v in rel[m].items()} for m in ms}
    print("\n# mean cost relative to the best path per shape (1.00 = always the best)")
    print(f"{'type':7s} {'M':>3s} " + " ".join(f"{p:>7s}" for p in paths) + "  choice")
    for tname, by_m in summary.items():
        steps = []
        for m in ms:
            choice = min(paths, key=lambda p: by_m[m][p])
            if not steps or steps[-1][1] != choice:
                steps.append((m, choice))
            print(f"{tname:7s} {m:>3d} " + " ".join(f"{by_m[m][p]:>7.2f}" for p in paths)
                  + f"  {choice}")
        print(f"# {tname}: {tuple(steps)}", flush=True)


SMOLLM2 = dict(layers=30, hidden=576, ffn=1536, q=576, kv=192, vocab=49152)


def bench_smollm2(args) -> None:
    """The linears of one SmolLM2-135M-Instruct Q4_1 decode step (and a prefill of 256 tokens):
    30 layers x (q, k, v, o, gate, up, down) in Q4_1 plus the tied Q8_0 LM head, which is what
    the default model holds (the token embedding lookup and attention are not included)."""
    rng = np.random.default_rng(0)
    c = SMOLLM2
    h = c["hidden"]
    shapes = [(c["q"], h), (c["kv"], h), (c["kv"], h), (h, c["q"]), (c["ffn"], h), (c["ffn"], h),
              (h, c["ffn"])]
    layers = [[QuantLinear.from_quant_tensor(random_tensor(QT.Q4_1, n, k, rng)) for n, k in shapes]
              for _ in range(c["layers"])]
    head = QuantLinear.from_quant_tensor(random_tensor(QT.Q8_0, c["vocab"], h, rng))
    total = sum(ql.nbytes for layer in layers for ql in layer) + head.nbytes
    x = torch.randn(1, h)
    xf = torch.randn(1, c["ffn"])

    def step():
        for q, k, v, o, g, u, d in layers:
            q.forward(x)
            k.forward(x)
            v.forward(x)
            o.forward(x)
            g.forward(x)
            u.forward(x)
            d.forward(xf)
        head.forward(x)

    t, tmed = timeit(step, max(args.budget, 2.0))
    print(f"SmolLM2-135M Q4_1 decode-step linears: {len(layers) * 7 + 1} calls, "
          f"{total / 2**20:.1f} MiB of weights: {t * 1e3:.2f} ms [median {tmed * 1e3:.2f}] "
          f"= {1 / t:.0f} tok/s upper bound, {total / t / 1e9:.1f} GB/s effective")
    th, _ = timeit(lambda: head.forward(x), args.budget)
    print(f"  of which LM head (49152 x 576 Q8_0, {head.nbytes / 2**20:.1f} MiB): "
          f"{th * 1e3:.2f} ms, {head.nbytes / th / 1e9:.1f} GB/s")
    m = 256
    xp = torch.randn(m, h)
    xpf = torch.randn(m, c["ffn"])

    def prefill():
        for q, k, v, o, g, u, d in layers:
            q.forward(xp)
            k.forward(xp)
            v.forward(xp)
            o.forward(xp)
            g.forward(xp)
            u.forward(xp)
            d.forward(xpf)

    tp, _ = timeit(prefill, max(args.budget, 2.0), max_reps=5)
    flops = 2.0 * m * sum(n * k for n, k in shapes) * c["layers"]
    print(f"  prefill {m} tokens, layer linears only (no LM head): {tp * 1e3:.1f} ms = "
          f"{m / tp:.0f} tok/s, {flops / tp / 1e9:.1f} GFLOP/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", default=",".join(DEFAULT_TYPES))
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES),
                   help="comma-separated NxK (out x in)")
    p.add_argument("--m", default="1,256", help="comma-separated rows of x")
    p.add_argument("--threads", type=int, default=0, help="torch/numba threads (default: as set)")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--no-fp32", dest="fp32", action="store_false",
                   help="skip the dequantized fp32 torch baseline")
    p.add_argument("--smollm2", action="store_true", help="time a SmolLM2-135M decode step instead")
    p.add_argument("--crossover", action="store_true",
                   help="time every path per type, real model shape and M = 1..32 instead")
    p.add_argument("--int8", action="store_true",
                   help="--crossover: the paths of numerics \"fast\" (gemm_i8, tiles_bf16)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--crossover: least rounds of alternating paths per (shape, M)")
    args = p.parse_args(argv)
    args.types = [s.strip() for s in args.types.split(",") if s.strip()]
    args.shapes_given = any(a.startswith("--shapes") for a in (argv or sys.argv[1:]))
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    args.m = [int(v) for v in args.m.split(",")]
    # numba first: starting its OpenMP layer here resets torch's thread count
    set_numba_threads(args.threads or torch.get_num_threads())
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# diptych bench_qlinear  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}"
          f"  cpus={os.cpu_count()}  torch threads={torch.get_num_threads()}  torch {torch.__version__}"
          f"  TILE_BYTES={qlm.TILE_BYTES}")
    quant = [QT[t] for t in args.types if QT[t] not in (QT.F32, QT.F16, QT.BF16)]
    t0 = time.perf_counter()
    n = kernel_cache.precompile(quant if not args.smollm2 else [QT.Q4_1, QT.Q8_0])
    if n:
        print(f"# compiled {n} numba kernels in {time.perf_counter() - t0:.1f} s (cached from now on)")
    if args.smollm2:
        bench_smollm2(args)
    elif args.crossover:
        bench_crossover(args)
    else:
        bench_shapes(args)


if __name__ == "__main__":
    sys.exit(main())
