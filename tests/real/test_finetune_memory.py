"""Peak resident memory of QLoRA training of SmolLM2-135M (Q4_1 kept quantized) on the CPU:
rank 8 on every projection, batch 4 x 256 tokens, gradient checkpointing. One optimizer
update through `diptych.finetune`, in a fresh process whose peak is its own."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

_RUN = """
import json, resource, sys
import numpy as np
import diptych
rng = np.random.default_rng(0)
vocab = [str(t) for t in range(100, 2000)]
records = [{"text": " ".join(rng.choice(vocab, 400))} for _ in range(4)]
result = diptych.finetune(sys.argv[1], train=records, out=sys.argv[2], backend="torch",
                          device="cpu", steps=1, rank=8, batch_size=4, max_seq_len=256,
                          grad_checkpointing=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"steps": result.steps, "loss": result.train_loss,
                  "peak_kib": int(status["VmHWM"].split()[0])}))
"""


def test_qlora_training_peak_rss_stays_below_one_gib(smollm2_path, tmp_path):
    done = subprocess.run([sys.executable, "-c", _RUN, str(smollm2_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] == 1 and 0 < report["loss"] < 20
    assert report["peak_kib"] < 1 << 20, f"peak RSS {report['peak_kib'] >> 10} MiB"
