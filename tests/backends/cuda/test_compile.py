"""The kernels through Triton's compiler for sm_90, on any machine (no GPU needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ON_GPU


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel test compiles natively")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 18
