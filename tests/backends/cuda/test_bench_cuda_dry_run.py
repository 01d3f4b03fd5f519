"""benchmarks/bench_cuda.py's sections for the open GPU work (speculative verify steps,
LoRA training beside PEFT) run end to end on the CPU with --dry-run (Triton's interpreter,
a tiny shape): the script scripts/gpu_checks.sh runs on a lent GPU has run before it gets
there, where device time is short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_benchmark_sections_run_on_the_cpu():
    out = subprocess.run([sys.executable, "benchmarks/bench_cuda.py", "verify", "train",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()
            if line.startswith("| tiny |")]
    verify, train = rows[:-1], rows[-1]
    assert [int(r[1]) for r in verify] == [1, 3]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in verify)
    assert float(train[1]) > 0 and float(train[3]) > 0   # both sides trained
