"""Dequantize, GEMV and GEMM kernels against the numpy reference dequantizer."""

import numpy as np
import pytest
import torch

from diptych.backends.torch.cuda.kernels import qmatmul as qm
from diptych.backends.torch.cuda.kernels.layout import plane_shapes
from diptych.backends.torch.cuda.kernels.weight import QuantWeight

from .blocks import KERNEL_TYPES, cols_for, make_weight
from .conftest import DTYPES, ON_GPU

ids = {"ids": lambda t: t.name}


def _weight(ggml_type, n_rows, device, **kw):
    qt = make_weight(ggml_type, n_rows, cols_for(ggml_type), **kw)
    return qt, QuantWeight.from_quant_tensor(qt, device)


def _check_matmul(y, x, ref_w, bias=None):
    """|y - x W^T| within a few roundings of the output dtype plus fp32 accumulation."""
    x64 = x.double().cpu().numpy()
    want = x64 @ ref_w.astype(np.float64).T
    if bias is not None:
        want += bias.double().cpu().numpy()
    scale = np.abs(x64) @ np.abs(ref_w.astype(np.float64)).T + 1e-30
    eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[y.dtype]
    err = np.abs(y.double().cpu().numpy() - want)
    assert (err <= eps * (scale + np.abs(want))).all(), err.max()


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES, **ids)
def test_dequantize_bit_exact(ggml_type, device):
    qt, w = _weight(ggml_type, 5, device, moderate=False)
    assert w.nbytes == qt.nbytes  # the planes hold exactly the GGUF bytes
    shapes = plane_shapes(ggml_type, *qt.shape)
    assert {k: (tuple(t.shape), t.dtype) for k, t in w.planes.items()} == \
        {k: (s, getattr(torch, d.name)) for k, (s, d) in shapes.items()}
    got = qm.dequantize(w, torch.float32).cpu().numpy()
    ref = qt.dequantize()
    if ON_GPU:  # FMA contraction may round Q4_1/Q5_1/K-quant affine terms once, not twice
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES, **ids)
def test_embedding_gather_fp16(ggml_type, device):
    qt, w = _weight(ggml_type, 7, device)
    rows = torch.tensor([6, 0, 3, 3], device=device)
    got = qm.dequantize(w, torch.float16, ids=rows).float().cpu().numpy()
    want = qt.dequantize()[rows.cpu().numpy()].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES, **ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv(ggml_type, dtype, device):
    qt, w = _weight(ggml_type, 21, device)  # 21 rows: a partial block of rows
    ref = qt.dequantize()
    bias = torch.randn(21, device=device)
    for m in (1, 3):
        x = torch.randn(m, qt.shape[1], generator=torch.Generator().manual_seed(m)).to(device, dtype)
        _check_matmul(qm.gemv(x, w, bias), x, ref, bias)


@pytest.mark.parametrize("ggml_type", [qm.QT.Q4_1, qm.QT.Q5_0, qm.QT.Q4_K, qm.QT.Q6_K], **ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm(ggml_type, dtype, device):
    qt, w = _weight(ggml_type, 24, device)
    x = torch.randn(20, qt.shape[1]).to(device, dtype)  # 20 rows: a partial M tile
    _check_matmul(qm.gemm(x, w, block_m=16, block_n=16, block_k=128), x, qt.dequantize())


def test_gemm_every_type_one_tile(device):
    for ggml_type in KERNEL_TYPES:
        qt, w = _weight(ggml_type, 16, device)
        x = torch.randn(16, qt.shape[1], device=device)
        _check_matmul(qm.gemm(x, w, block_m=16, block_n=16, block_k=256), x, qt.dequantize())


def test_dequant_matmul_in_row_tiles(device, monkeypatch):
    monkeypatch.setattr(qm, "DEQUANT_TILE_ELEMENTS", 16 * 512)  # 16-row tiles: 3 of them
    qt, w = _weight(qm.QT.Q5_K, 40, device)
    x = torch.randn(5, 512, device=device)
    bias = torch.randn(40, device=device)
    _check_matmul(qm.dequant_matmul(x, w, bias), x, qt.dequantize(), bias)


def test_qmatmul_picks_path_by_rows(device, monkeypatch):
    calls = []
    for name in ("gemv", "gemm", "dequant_matmul"):
        monkeypatch.setattr(qm, name, lambda x, w, b, _n=name: calls.append(_n))
    for m in (1, qm.GEMV_MAX_M, qm.GEMV_MAX_M + 1, qm.DEQUANT_MM_MIN_M):
        qm.qmatmul(torch.zeros(m, 32), None)
    assert calls == ["gemv", "gemv", "gemm", "dequant_matmul"]


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES, **ids)
def test_gemv_by_expert_id(ggml_type, device):
    """Stacked experts (3 of 10 rows: row blocks that straddle two experts): pair p multiplies
    the expert ids[p] picks by row p // 2 of x, as MoE decode does with two experts a token."""
    from diptych.backends.torch.cuda.kernels.weight import QuantExperts
    from diptych.quant import QuantTensor

    qt = make_weight(ggml_type, 30, cols_for(ggml_type))
    experts = QuantExperts.from_quant_tensor(
        QuantTensor(qt.name, qt.ggml_type, (3, 10, qt.shape[1]), qt.data), device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, qt.shape[1], generator=g).to(device)
    chosen = torch.tensor([2, 0, 1, 2, 0, 1], device=device)
    y = qm.gemv_id(x, experts.stacked, chosen, experts.rows)
    ref = qt.dequantize().reshape(3, 10, -1)
    for p, e in enumerate(chosen.tolist()):
        _check_matmul(y[p:p + 1], x[p // 2:p // 2 + 1], ref[e])
    np.testing.assert_array_equal(qm.dequantize(experts[1], torch.float32).cpu().numpy(), ref[1])
