"""Peak RSS of one QLoRA training step (gradients of every adapter pair) on a GGUF model,
the base kept quantized: resident memory after imports, after loading, and at the step.

    python benchmarks/finetune_memory.py [MODEL] [--batch 4] [--seq 256] [--rank 8]
                                         [--no-checkpointing]

MODEL defaults to the embedded SmolLM2-135M-Instruct Q4_1. Run it in a fresh process per
setting: the peak is the process's.
"""

import argparse
import resource

import numpy as np
import psutil


def mib() -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    return f"{psutil.Process().memory_info().rss >> 20} MiB (peak {peak} MiB)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    from diptych.load_plan import LoadPlan
    from diptych.training import allocator
    from diptych.training.data import Example
    from diptych.training.loop import Trainer
    from diptych.training.options import TrainOptions

    print("imported", mib())
    plan = LoadPlan.open(args.model, "torch", n_ctx=16, n_batch=16)
    eng = plan.engine()
    print("loaded  ", mib())
    rng = np.random.default_rng(0)
    examples = [Example(tuple(int(i) for i in rng.integers(100, 40000, args.seq)),
                        (True,) * args.seq) for _ in range(args.batch)]
    opts = TrainOptions(rank=args.rank, batch_size=args.batch, max_seq_len=args.seq,
                        grad_checkpointing=not args.no_checkpointing, steps=1)
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples, opts, "/tmp/finetune-memory")
    allocator.hand_back_freed_memory()   # as Trainer.run does
    trainer.gradients(0)
    print("step    ", mib())


if __name__ == "__main__":
    main()
