"""Where one LoRA training step's time goes on the torch CPU backend: forward, recompute and
backward, split into the quantized matrices' dequantization and matmuls, attention, the
output head and loss, the optimizer, and the rest (Python and small ops).

    python benchmarks/profile_training.py [MODEL] [--batch 4] [--seq 256] [--steps 2]

The setting of bench_training.py (rank 8 on all seven linears, gradient checkpointing,
random tokens). The first update is a warm-up; the others run under torch.profiler, with
the dequantization (numba, invisible to the profiler) and the phases marked by
record_function. Prints milliseconds per update for each bucket.
"""

import argparse
import collections
import time

import numpy as np
import torch
from torch.autograd.profiler import record_function

from diptych.backends.torch.cpu import qlinear
from diptych.load_plan import LoadPlan
from diptych.training import allocator
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions

# aten ops -> bucket (an op's self time; anything else counts as "other ops")
_OPS = {
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::addmm_": "matmul",
    "aten::bmm": "matmul", "aten::matmul": "matmul", "aten::linear": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::_log_softmax": "log_softmax", "aten::_log_softmax_backward_data": "log_softmax",
}


def _marked_tiles(tiles):
    """QuantLinear._tiles with each tile's dequantization marked for the profiler."""
    def wrapper(self):
        gen = tiles(self)
        while True:
            with record_function("dequantize"):
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item
    return wrapper


def _bucket(event, parents) -> str:
    names = [p.name for p in parents]
    phase = "optimizer" if "adamw" in names else (
        "recompute" if "recompute" in names else (
            "backward" if "backward" in names else "forward"))
    if event.name == "dequantize":
        return f"{phase}: dequantize"
    where = "head+loss " if "head" in names else ""
    return f"{phase}: {where}{_OPS.get(event.name, 'other ops')}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    if args.model is None:
        from diptych.sources.default_model import default_model_path

        args.model = str(default_model_path())
    eng = LoadPlan.open(args.model, "torch", device="cpu", n_ctx=16, n_batch=16).engine()
    be = eng.backend
    rng = np.random.default_rng(0)
    data = [Example(tuple(int(i) for i in rng.integers(100, 40000, args.seq)),
                    (True,) * args.seq) for _ in range(args.batch * (args.steps + 1))]
    trainer = Trainer(be, eng.cfg, eng.weights, data,
                      TrainOptions(rank=8, alpha=16, batch_size=args.batch,
                                   max_seq_len=args.seq, grad_checkpointing=True,
                                   steps=args.steps + 1), "/tmp/profile-training")
    qlinear.QuantLinear._tiles = _marked_tiles(qlinear.QuantLinear._tiles)
    # phases: what a checkpointed function runs a second time is the recompute
    calls = collections.Counter()
    checkpoint = be.checkpoint

    def marked_checkpoint(fn):
        def run(*a):
            calls[id(fn)] += 1
            label = "recompute" if calls[id(fn)] % 2 == 0 else "first"
            with record_function(label):
                return fn(*a)
        return checkpoint(run)

    be.checkpoint = marked_checkpoint
    head_loss = be.token_log_likelihood

    def marked_head(*a, **k):
        with record_function("head"):
            return head_loss(*a, **k)

    be.token_log_likelihood = marked_head

    def value_and_grad(fn, params):
        leaves = [x.detach().requires_grad_() for x in params]
        loss = fn(leaves)
        with record_function("backward"):
            loss.backward()
        return float(loss.detach()), [x.grad for x in leaves]

    be.value_and_grad = value_and_grad
    allocator.hand_back_freed_memory(trainer.activation_bytes)

    def update(u):
        _, grads, _ = trainer.gradients(u)
        with record_function("adamw"):
            trainer.params, trainer.moments = be.adamw(trainer.params, grads, trainer.moments,
                                                       u + 1, 1e-4, (0.9, 0.999), 1e-8, 0.0)
        allocator.trim()

    update(0)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for u in range(1, args.steps + 1):
            update(u)
    wall = (time.perf_counter() - start) / args.steps
    cpu = (time.process_time() - cpu) / args.steps
    totals, others = collections.Counter(), collections.Counter()
    for e in prof.events():
        parents, q = [], e.cpu_parent
        while q is not None:
            parents.append(q)
            q = q.cpu_parent
        # the dequantize ranges whole (numba inside), every aten op by its self time
        if e.name == "dequantize" or e.name.startswith("aten::"):
            bucket = _bucket(e, parents)
            ms = (e.cpu_time_total if e.name == "dequantize" else e.self_cpu_time_total) / 1e3
            totals[bucket] += ms / args.steps
            if bucket.endswith("other ops"):
                others[e.name] += ms / args.steps
    tokens = args.batch * (args.seq - 1)
    print(f"{wall * 1e3:.0f} ms per update ({tokens / wall:.1f} tokens/s, profiler on), "
          f"{cpu * 1e3:.0f} ms of CPU time on {torch.get_num_threads()} threads")
    for name, ms in sorted(totals.items()):
        print(f"  {name:40s} {ms:8.0f} ms  {100 * ms / (wall * 1e3):5.1f} %")
    accounted = sum(totals.values())
    print("  the largest of the other ops:", ", ".join(
        f"{name} {ms:.0f}" for name, ms in others.most_common(8)))
    print(f"  {'unaccounted (Python, numba outside tiles)':40s} {wall * 1e3 - accounted:8.0f} ms"
          f"  {100 * (1 - accounted / (wall * 1e3)):5.1f} %")


if __name__ == "__main__":
    main()
