"""LoRA training speed and peak memory: diptych (the base kept quantized, torch CPU) beside
transformers + PEFT (the same GGUF dequantized to fp32), same random data, sequence length,
batch, rank and target modules (all seven linears), AdamW, gradient checkpointing on both.

    python benchmarks/bench_training.py [MODEL] [--steps 3] [--batch 4] [--seq 256]

Each side runs in its own process (its peak RSS is its own), one after the other; the
first update of each is a warm-up and is not timed. Prints training tokens/s and peak RSS.
"""

import argparse
import json
import subprocess
import sys
import time

_OURS = """
import json, sys, time
import numpy as np
from diptych.load_plan import LoadPlan
from diptych.training import allocator
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions
path, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eng = LoadPlan.open(path, "torch", device="cpu", n_ctx=16, n_batch=16).engine()
rng = np.random.default_rng(0)
data = [Example(tuple(int(i) for i in rng.integers(100, 40000, seq)), (True,) * seq)
        for _ in range(batch * (steps + 1))]
opts = TrainOptions(rank=8, alpha=16, batch_size=batch, max_seq_len=seq,
                    grad_checkpointing=True, steps=steps + 1)
trainer = Trainer(eng.backend, eng.cfg, eng.weights, data, opts, "/tmp/bench-training")
allocator.hand_back_freed_memory()
for update in range(steps + 1):
    if update == 1:
        start = time.perf_counter()
    loss, grads, tokens = trainer.gradients(update)
    trainer.params, trainer.moments = eng.backend.adamw(
        trainer.params, grads, trainer.moments, update + 1, 1e-4, (0.9, 0.999), 1e-8, 0.0)
    allocator.trim()
elapsed = time.perf_counter() - start
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"tokens_per_s": steps * batch * (seq - 1) / elapsed,
                  "peak_mib": int(status["VmHWM"].split()[0]) >> 10}))
"""

_PEFT = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
path, steps, batch, seq = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32)
model.gradient_checkpointing_enable()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
rng = np.random.default_rng(0)
for update in range(steps + 1):
    if update == 1:
        start = time.perf_counter()
    ids = torch.from_numpy(rng.integers(100, 40000, (batch, seq)))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
elapsed = time.perf_counter() - start
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"tokens_per_s": steps * batch * (seq - 1) / elapsed,
                  "peak_mib": int(status["VmHWM"].split()[0]) >> 10}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    if args.model is None:
        from diptych.sources.default_model import default_model_path

        args.model = str(default_model_path())
    rest = [args.model, str(args.steps), str(args.batch), str(args.seq)]
    for name, code in (("diptych", _OURS), ("transformers+peft", _PEFT)):
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *rest], capture_output=True,
                              text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:18s} {result['tokens_per_s']:7.1f} tok/s  peak {result['peak_mib']} MiB"
              f"  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
