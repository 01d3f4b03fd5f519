"""Peak resident memory of QLoRA training of SmolLM2-135M (Q4_1 kept quantized) on the CPU:
rank 8 on every projection, batch 4 x 256 tokens, gradient checkpointing. One optimizer
update through `diptych.finetune`, in a fresh process whose peak is its own: the whole
process, imports included, stays below 1 GiB. The imports' own share (torch, numba: 280-400
MiB) depends on how much of their shared libraries the loader maps, more in a freshly
installed environment; the assertion's message gives the split."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

_RUN = """
import json, sys
import numpy as np
import diptych
from diptych.backends.torch.cpu import backend  # torch and numba, imported as training does

def rss(field):
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status[field].split()[0])

base = rss("VmRSS")
rng = np.random.default_rng(0)
vocab = [str(t) for t in range(100, 2000)]
records = [{"text": " ".join(rng.choice(vocab, 400))} for _ in range(4)]
result = diptych.finetune(sys.argv[1], train=records, out=sys.argv[2], backend="torch",
                          device="cpu", steps=1, rank=8, batch_size=4, max_seq_len=256,
                          grad_checkpointing=True)
print(json.dumps({"steps": result.steps, "loss": result.train_loss,
                  "base_kib": base, "peak_kib": rss("VmHWM"),
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def test_qlora_training_peak_rss_stays_below_one_gib(smollm2_path, tmp_path):
    done = subprocess.run([sys.executable, "-c", _RUN, str(smollm2_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] == 1 and 0 < report["loss"] < 20
    peak, base = report["peak_kib"] >> 10, report["base_kib"] >> 10
    assert peak < 1024, (f"peak RSS {peak} MiB: {base} MiB after the imports, training added "
                         f"{peak - base} MiB" + (" (torch._dynamo was imported)"
                                                 if report["dynamo"] else ""))
