"""Resident memory of one QLoRA training step (gradients of every adapter pair) on a GGUF
model, the base kept quantized, stage by stage: after the imports, after loading, with the
trainer built, through the forward pass (its peak and its end), through the backward pass
(its peak), and after the heaps are trimmed. VmRSS is sampled every 2 ms by a thread;
each line also gives the anonymous and file-backed parts (shared libraries' pages are
file-backed).

    python benchmarks/finetune_memory.py [MODEL] [--batch 4] [--seq 256] [--rank 8]
                                         [--no-checkpointing]

MODEL defaults to the embedded SmolLM2-135M-Instruct Q4_1. Run it in a fresh process per
setting: the peak is the process's.
"""

import argparse
import threading
import time

import numpy as np


def _status() -> dict[str, int]:
    """/proc/self/status's memory fields, MiB."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) >> 10
    return out


class Stages:
    """Prints each stage's resident memory and the peak VmRSS sampled since the last one."""

    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, _status()["VmRSS"])
            time.sleep(0.002)

    def mark(self, stage: str) -> None:
        s = _status()
        peak, self.peak = max(self.peak, s["VmRSS"]), 0
        print(f"{stage:24s} {s['VmRSS']:5d} MiB (anon {s['RssAnon']:4d}, file "
              f"{s['RssFile']:4d}); peak since the last line {peak:5d}; "
              f"process peak {s['VmHWM']:5d}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    stages = Stages()
    from diptych.backends.torch.cpu import backend  # noqa: F401  torch and numba
    from diptych.load_plan import LoadPlan
    from diptych.training import allocator
    from diptych.training.data import Example
    from diptych.training.loop import Trainer
    from diptych.training.options import TrainOptions

    stages.mark("imported")
    plan = LoadPlan.open(args.model, "torch", device="cpu", n_ctx=16, n_batch=16)
    eng = plan.engine()
    plan.tokenizer()
    stages.mark("loaded")
    rng = np.random.default_rng(0)
    examples = [Example(tuple(int(i) for i in rng.integers(100, 40000, args.seq)),
                        (True,) * args.seq) for _ in range(args.batch)]
    opts = TrainOptions(rank=args.rank, batch_size=args.batch, max_seq_len=args.seq,
                        grad_checkpointing=not args.no_checkpointing, steps=1)
    trainer = Trainer(eng.backend, eng.cfg, eng.weights, examples, opts,
                      "/tmp/finetune-memory")
    allocator.hand_back_freed_memory(trainer.activation_bytes)   # as Trainer.run does
    stages.mark("trainer built")
    be = trainer.be
    value_and_grad = be.value_and_grad

    def marked(fn, params):  # the forward pass ends where the loss is returned
        def forward(p):
            loss = fn(p)
            stages.mark("forward pass")
            return loss
        return value_and_grad(forward, params)

    be.value_and_grad = marked
    trainer.gradients(0)
    stages.mark("backward pass")
    allocator.trim()
    stages.mark("heaps trimmed")


if __name__ == "__main__":
    main()
