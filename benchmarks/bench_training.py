"""LoRA training speed and peak memory: diptych (the base kept quantized) beside a peer,
same random data, sequence length, batch, rank and target modules (all seven linears),
AdamW, gradient checkpointing on both.

    python benchmarks/bench_training.py [MODEL] [--steps 3] [--batch 4] [--seq 256]
                                        [--repeats 2] [--peer peft|mlx-lm]
                                        [--compute-dtype auto|fp32|bf16]

--peer peft (default): diptych on torch's CPU backend beside transformers + PEFT on the
same GGUF dequantized to fp32 by transformers. --peer mlx-lm: diptych on MLX beside
`mlx_lm`'s LoRA (its LoRA layers, gradient checkpointing and compiled step, as
`mlx_lm.lora` trains) on an mlx-lm checkpoint holding diptych's own repacked arrays
(benchmarks/bench_mlx.py's "same-w"): the same weights on both sides.

Each side runs in its own process (its peak RSS is its own); the sides alternate, each
repeat in the other order, so that a changing load on the machine falls on both alike.
The first update of each process is a warm-up and is not timed. Prints every run's
training tokens/s, CPU milliseconds per token (the process's CPU time: what the run costs
whatever the kernel's thread placement, which on some VMs varies from process to process)
and peak RSS, then each side's median and the ratios.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

_OURS = """
import json, sys, time
import numpy as np
from diptych.load_plan import LoadPlan
from diptych.training import allocator
from diptych.training.data import Example
from diptych.training.loop import Trainer
from diptych.training.options import TrainOptions
path, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eng = LoadPlan.open(path, sys.argv[5], device="cpu", n_ctx=16, n_batch=16).engine()
rng = np.random.default_rng(0)
data = [Example(tuple(int(i) for i in rng.integers(100, 40000, seq)), (True,) * seq)
        for _ in range(batch * (steps + 1))]
opts = TrainOptions(rank=8, alpha=16, batch_size=batch, max_seq_len=seq,
                    grad_checkpointing=True, steps=steps + 1, compute_dtype=sys.argv[6])
trainer = Trainer(eng.backend, eng.cfg, eng.weights, data, opts, "/tmp/bench-training")
print("compute dtype", trainer.compute_dtype, file=sys.stderr)
allocator.hand_back_freed_memory(trainer.activation_bytes)
for update in range(steps + 1):
    if update == 1:
        start, cpu = time.perf_counter(), time.process_time()
    loss, grads, tokens = trainer.gradients(update)
    trainer.params, trainer.moments = eng.backend.adamw(
        trainer.params, grads, trainer.moments, update + 1, 1e-4, (0.9, 0.999), 1e-8, 0.0)
    allocator.trim()
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"tokens_per_s": steps * batch * (seq - 1) / elapsed,
                  "cpu_ms_per_token": 1000 * cpu / (steps * batch * (seq - 1)),
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
        start, cpu = time.perf_counter(), time.process_time()
    ids = torch.from_numpy(rng.integers(100, 40000, (batch, seq)))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"tokens_per_s": steps * batch * (seq - 1) / elapsed,
                  "cpu_ms_per_token": 1000 * cpu / (steps * batch * (seq - 1)),
                  "peak_mib": int(status["VmHWM"].split()[0]) >> 10}))
"""

_MLX_LM = """
import json, sys, time
from functools import partial
import numpy as np
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx_lm import load
from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers
path, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, _ = load(path)
model.freeze()
keys = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
linear_to_lora_layers(model, len(model.layers),
                      {"rank": 8, "scale": 16 / 8, "dropout": 0.0, "keys": keys})
grad_checkpoint(model.layers[0])
opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
loss_and_grad = nn.value_and_grad(model, default_loss)
state = [model.state, opt.state]

@partial(mx.compile, inputs=state, outputs=state)
def step(ids, lengths):
    (loss, _), grad = loss_and_grad(model, ids, lengths)
    opt.update(model, grad)
    return loss

model.train()
rng = np.random.default_rng(0)
lengths = mx.array([[0, seq]] * batch)   # every target counts
for update in range(steps + 1):
    if update == 1:
        start, cpu = time.perf_counter(), time.process_time()
    mx.eval(step(mx.array(rng.integers(100, 40000, (batch, seq))), lengths), state)
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"tokens_per_s": steps * batch * (seq - 1) / elapsed,
                  "cpu_ms_per_token": 1000 * cpu / (steps * batch * (seq - 1)),
                  "peak_mib": int(status["VmHWM"].split()[0]) >> 10}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peer", choices=("peft", "mlx-lm"), default="peft")
    p.add_argument("--compute-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="diptych's TrainOptions.compute_dtype (the peers stay fp32)")
    p.add_argument("--work", default="/tmp/bench-training",
                   help="where --peer mlx-lm writes its checkpoint")
    args = p.parse_args()
    if args.model is None:
        from diptych.sources.default_model import default_model_path

        args.model = str(default_model_path())
    rest = [str(args.steps), str(args.batch), str(args.seq)]
    if args.peer == "peft":
        sides = [("diptych", _OURS, [args.model, *rest, "torch", args.compute_dtype]),
                 ("transformers+peft", _PEFT, [args.model, *rest])]
    else:
        from bench_mlx import write_same_weights

        ckpt = Path(args.work) / (Path(args.model).stem + "-mlx-same")
        if not (ckpt / "config.json").exists():
            write_same_weights(Path(args.model), ckpt)
        sides = [("diptych", _OURS, [args.model, *rest, "mlx", args.compute_dtype]),
                 ("mlx_lm", _MLX_LM, [str(ckpt), *rest])]
    runs = {name: [] for name, _, _ in sides}
    for r in range(args.repeats):
        for name, code, argv in (sides if r % 2 == 0 else sides[::-1]):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                                  text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"{name:18s} {result['tokens_per_s']:7.1f} tok/s  "
                  f"{result['cpu_ms_per_token']:6.2f} CPU ms/token  peak {result['peak_mib']} "
                  f"MiB  ({time.perf_counter() - t:.0f} s)", flush=True)
    medians = {name: tuple(statistics.median(x[k] for x in rs)
                           for k in ("tokens_per_s", "cpu_ms_per_token", "peak_mib"))
               for name, rs in runs.items()}
    for name, (speed, cpu, peak) in medians.items():
        print(f"median {name:18s} {speed:7.1f} tok/s  {cpu:6.2f} CPU ms/token  peak {peak:.0f} MiB")
    (ours, our_cpu, our_peak), (peer, peer_cpu, peer_peak) = medians["diptych"], medians[sides[1][0]]
    print(f"diptych / {sides[1][0]}: {ours / peer:.2f}x tokens/s, {peer_cpu / our_cpu:.2f}x tokens "
          f"per CPU second, at {our_peak / peer_peak:.2f}x peak RSS")


if __name__ == "__main__":
    main()
