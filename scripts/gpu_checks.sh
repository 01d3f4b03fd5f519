#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run on a machine that has one and nothing else of
# ours: the Triton kernels and the captured decode and verify steps on the device
# (tests/backends/cuda), then the figures of benchmarks/bench_cuda.py: speculative verify
# steps by width (CUDA graph and eager), LoRA fine-tuning beside transformers + PEFT, the
# quantized GEMV against the copy bandwidth and decode against its floor.
#
# The machine needs Python 3.10+ with torch (CUDA), triton, numba, transformers, peft,
# tokenizers, jinja2, pytest; what it lacks of diptych's dependencies travels as wheels in
# .whl/ (ignored by git). Made beforehand, where pip can reach an index:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
#
# Then, from the repository root there: bash scripts/gpu_checks.sh
# Dry run on a CPU-only machine first (the same steps, the kernels in Triton's interpreter,
# a tiny shape, no tests): GPU_CHECKS_DRY_RUN=1 bash scripts/gpu_checks.sh
#
# Every step has a time limit of its own, so that a slow one cannot take the others' time;
# logs and tables go to $OUT (default /tmp/gpu-checks), a line per step to summary.txt.
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
dry=${GPU_CHECKS_DRY_RUN:-}

if [ -z "$dry" ]; then
    site=/tmp/gpu-checks-site
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
            || exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . \
        || exit 1
    export PYTHONPATH=$site
    nvidia-smi -L | tee "$out/device.txt"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/device.txt"

step() {   # step SECONDS NAME COMMAND...: run it, keep its log, note how it ended
    local limit=$1 name=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
}

if [ -n "$dry" ]; then
    step 900 bench-dry-run python3 benchmarks/bench_cuda.py verify train --dry-run
    exit 0
fi
step 240 tests python3 -m pytest tests/backends/cuda -q -x -p no:cacheprovider \
    --ignore=tests/backends/cuda/test_bench_cuda_dry_run.py   # that one is for CPU-only CI
step 150 verify-train python3 benchmarks/bench_cuda.py verify train --models 0.5b 1.5b
step 150 gemv-decode python3 benchmarks/bench_cuda.py gemv decode --models 135m 1.5b 7b \
    --tokens 64 --no-hf
