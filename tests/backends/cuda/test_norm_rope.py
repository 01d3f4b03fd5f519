"""RMSNorm (+ residual) and RoPE kernels against the CPU backend's torch ops."""

import pytest
import torch
import torch.nn.functional as F

from diptych.backends.base import RopeSpec
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.cuda.kernels import norm

from .conftest import DTYPES

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_residual(dtype, device):
    x = torch.randn(2, 3, 72).to(device, dtype)  # 72: a masked tail of the 128-wide block
    r = torch.randn(2, 3, 72).to(device, dtype)
    w = torch.randn(72, device=device)
    want = F.rms_norm(x.float(), (72,), w, 1e-5)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-5).float(), want, rtol=TOL[dtype],
                               atol=TOL[dtype])
    wide = torch.randn(2, 3, 100).to(device, dtype)[..., 10:82]  # a strided view (MLA's c_kv)
    torch.testing.assert_close(norm.rms_norm(wide, w, 1e-5).float(),
                               F.rms_norm(wide.float(), (72,), w, 1e-5), rtol=TOL[dtype],
                               atol=TOL[dtype])
    s, y = norm.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(y.float(), F.rms_norm((x + r).float(), (72,), w, 1e-5),
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rot_dim", [24, 16])  # whole head, and a partial rotary dim
def test_rope_matches_cpu_backend(dtype, rot_dim, device):
    spec = RopeSpec(rot_dim, 10000.0)
    cpu = CpuBackend()
    x = torch.randn(2, 3, 5, 24)  # 5 heads, head dim 24: masked in both directions
    pos = torch.tensor([[0, 1, 2], [40, 41, 900]])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    got = norm.rope(x.to(device, dtype), pos.to(device), inv_freq.float().to(device))
    want = cpu.rope(x.to(dtype).float(), pos, spec)  # float64 angles
    tol = max(TOL[dtype], 1e-4)  # fp32 angles at position 900: ~5e-5 rad
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
