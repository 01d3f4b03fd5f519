"""The int8-activation path of the CPU quantized linear: int8_activations.py's rounding of x
and kernel_source.py's gemm_i8 (AVX-512 VNNI), against gguf-py's dequantized weights.

- The rounding equals a numpy transcription bit for bit: codes, scales, sums of codes.
- Each gemm_i8 type's product is within test_qlinear's fp32 bound of x8 @ W.T, x8 the
  rounded x: the integer sums are exact, so only each unit's float work rounds.
- A row's output has the same bits whatever M (a verify step gives what decode gives).
- Wider steps take gemm_i8 too, or where bf16 is native multiply bf16 copies of x and
  of the tiles.
- Only weights prepared for numerics "fast" take it (not "exact", the default, nor
  "llama.cpp"), and only in inference steps, not under autograd.
- DIPTYCH_CPU_INT8=0 turns it off, and a CPU without VNNI never compiles it (both: the
  fp32 kernels, exact to test_qlinear's bound).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from diptych.backends.torch.cpu import int8_activations as i8
from diptych.backends.torch.cpu import kernel_cache
from diptych.backends.torch.cpu import qlinear as qlm
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.cpu.kernel_source import I8_TYPES
from diptych.quant import QuantTensor

from .test_qlinear import assert_close, k_for, make, random_data, relative_error

vnni = pytest.mark.skipif(not i8.SUPPORTED, reason="the CPU has no AVX-512 VNNI")
ROOT = Path(__file__).resolve().parents[3]


def rounded(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, sums per 16) of x, transcribed from int8_activations' docstring."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(blocks * inv[:, :, None]).astype(np.int8).reshape(m, k)
    s = q.reshape(m, k // 16, 16).astype(np.int32).sum(axis=2, dtype=np.int32)
    return q, (amax / np.float32(127.0)).astype(np.float32), s


def make8(t: T, n: int, k: int, **kw):
    """A QuantLinear as CpuBackend prepares it for numerics "fast", and its weights."""
    ql, w = make(t, n, k, **kw)
    ql.int8 = True
    return ql, w


def x8(x: np.ndarray) -> np.ndarray:
    q, d, _ = rounded(x)
    return (q.reshape(len(x), -1, 32).astype(np.float32) * d[:, :, None]).reshape(x.shape)


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernels():
    kernel_cache.precompile(I8_TYPES, kinds=("gemm_i8", "gemm_s"), processes=2)


def test_rounding_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256), dtype=np.float32) * np.float32(3.0)
    x[0, :32] = 0.0                              # a zero block: scale 0, codes 0
    x[1, 32:64] *= np.float32(1e-30)             # tiny values
    x[2, 64:96] = np.float32(127.0) * rng.integers(-3, 4, 32).astype(np.float32) / 2  # halves
    got, want = i8.quantize_rows(x), rounded(x)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    assert np.abs(got[0]).max() == 127


@vnni
@pytest.mark.parametrize("t", I8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,wide", [(165, False), (37, True)])  # groups + a tail; a tail only
def test_product_of_the_rounded_x(t, n, wide):
    k = k_for(t)
    ql, w = make8(t, n, k, seed=n, wide=wide)
    rng = np.random.default_rng(2)
    for m in (1, 2, 3, 17):
        x = rng.standard_normal((m, k), dtype=np.float32)
        with torch.inference_mode():
            assert ql._path(m) == "gemm_i8"
            y = ql.forward(torch.from_numpy(x))
        assert_close(y, x8(x), w)


@vnni
@pytest.mark.parametrize("t", [T.Q4_1, T.Q6_K], ids=lambda t: t.name)
def test_wide_steps_take_gemm_i8_or_bf16_tiles(t, monkeypatch):
    """Without AMX the widest steps take gemm_i8 too (each row's bits as at one row); with
    it, they multiply bf16 copies of x and of the tiles, as torch's bf16 product of the two
    does, where the rounded x's products are ~3e-3 away."""
    k, m = k_for(t), 300
    ql, w = make8(t, 70, k, seed=10)
    x = np.random.default_rng(11).standard_normal((m, k), dtype=np.float32)
    monkeypatch.setattr(qlm, "AMX_BF16", False)
    with torch.inference_mode():
        assert ql._path(m) == "gemm_i8"
        y = ql.forward(torch.from_numpy(x))
        rows = ql.forward(torch.from_numpy(x[:3]))
    assert_close(y, x8(x), w)
    assert torch.equal(y[:3], rows)

    monkeypatch.setattr(qlm, "AMX_BF16", True)
    with torch.inference_mode():
        assert ql._path(m) == "tiles_bf16" and ql._path(32) == "gemm_i8"
        yb = ql.forward(torch.from_numpy(x))
    want = (torch.from_numpy(x).to(torch.bfloat16)
            @ torch.from_numpy(w).to(torch.bfloat16).T).float()
    assert yb.dtype == torch.float32
    assert relative_error(yb, want) <= 1e-5 and relative_error(y, want) > 1e-3


@vnni
@pytest.mark.parametrize("t", [T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_row_does_not_depend_on_m(t):
    k = k_for(t)
    ql, _ = make8(t, 100, k, seed=4)
    x = np.random.default_rng(5).standard_normal((7, k), dtype=np.float32)
    with torch.inference_mode():
        whole = ql.forward(torch.from_numpy(x))
        rows = [ql.forward(torch.from_numpy(x[i:i + 1])) for i in range(7)]
    assert torch.equal(whole, torch.cat(rows))


@vnni
def test_only_inference_steps_round():
    t, k = T.Q4_K, k_for(T.Q4_K)
    ql, w = make8(t, 70, k, seed=6)
    x = np.random.default_rng(7).standard_normal((2, k), dtype=np.float32)
    assert ql._path(2) == "gemm_s"                    # outside inference mode
    xt = torch.from_numpy(x).requires_grad_()
    assert_close(ql.forward(xt).detach(), x, w)       # autograd: exact
    data = random_data(t, 70, k, np.random.default_rng(6))

    def prepared(*calls: str) -> bool:
        be = CpuBackend()
        for c in calls:
            getattr(be, c)()
        return be.prepare(QuantTensor("w", t, (70, k), data)).int8

    assert not prepared()                                           # "exact", the default
    assert prepared("use_fast_products")                            # "fast"
    assert not prepared("use_fast_products", "use_llama_cpp_rounding")


PROBE = """
import numpy as np, torch
from gguf import GGMLQuantizationType as T
from diptych.backends.torch.cpu import int8_activations as i8
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.quant import QuantTensor
from tests.backends.cpu import test_qlinear as tq
print(i8.SUPPORTED, i8.ENABLED)
be = CpuBackend()
be.use_fast_products()
for t in (T.Q4_1, T.Q6_K):
    k = tq.k_for(t)
    data = tq.random_data(t, 165, k, np.random.default_rng(8))
    ql, w = be.prepare(QuantTensor("w", t, (165, k), data)), tq.oracle(data, t, 165, k)
    x = np.random.default_rng(9).standard_normal((3, tq.k_for(t)), dtype=np.float32)
    with torch.inference_mode():
        assert ql._path(3) == "gemm_s"
        tq.assert_close(ql.forward(torch.from_numpy(x)), x, w)
print("ok")
"""


def test_fp32_kernels_when_turned_off():
    """DIPTYCH_CPU_INT8=0: even numerics "fast" takes the exact fp32 kernels (a CPU without
    VNNI: test_qlinear's test_gemm_s_without_avx512)."""
    env = {**os.environ, "DIPTYCH_CPU_INT8": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    supported, enabled, ok = out.stdout.split()
    assert supported == str(i8.SUPPORTED) and enabled == "False" and ok == "ok"
