"""Triton kernel tests: on the CPU through TRITON_INTERPRET=1, on a GPU natively.

The interpreter must be switched on before any kernel module is imported (triton.jit reads
it when a kernel is decorated), so this file does it at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 arithmetic is wrong in the interpreter: checked only on a GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


@pytest.fixture
def device():
    return DEVICE
