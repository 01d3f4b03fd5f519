"""Checks that need a CUDA device: real sizes in bf16, and the captured decode step.
(On the CPU they are skipped; the interpreter versions of the same kernels are the other
test files.)"""

import numpy as np
import pytest
import torch


from .blocks import KERNEL_TYPES, make_weight
from .conftest import gpu_only

pytestmark = gpu_only


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES, ids=lambda t: t.name)
def test_real_size_gemv_gemm_bf16(ggml_type):
    from diptych.backends.torch.cuda.kernels import qmatmul as qm
    from diptych.backends.torch.cuda.kernels.weight import QuantWeight

    qt = make_weight(ggml_type, 4096, 4096, seed=int(ggml_type))
    w = QuantWeight.from_quant_tensor(qt, "cuda")
    ref = torch.from_numpy(qt.dequantize()).cuda()
    for m, fn in ((1, qm.gemv), (4, qm.gemv), (100, qm.gemm), (600, qm.dequant_matmul)):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ ref.T
        got = fn(x, w).float()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 2e-2, (m, fn.__name__, float(err))


def test_long_context_attention_bf16():
    from diptych.backends.torch.cuda.kernels import attention as at

    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    pos = torch.tensor([[8000]], device="cuda")
    got = at.decode_attention(q, kc, vc, pos, 128 ** -0.5).float()
    keys, values = kc[:, :, :8001].float(), vc[:, :, :8001].float()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), keys, values, scale=128 ** -0.5, enable_gqa=True)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "mistral", "deepseek_v2", "deepseek_v3"])
def test_graph_step_replays_eager_results(tmp_path, caplog, family):
    """Steps of width 1 and 3 (a decode and a two-token draft's verification), captured
    once per width, against the same steps run eagerly; rings wrap, drafts roll back; MoE
    included: routing and expert choice stay on the device."""
    from diptych.backends.torch.cuda.backend import CudaBackend
    from diptych.load_plan import LoadPlan

    from ...tiny_models import tiny_hf_model, write_gguf

    path = write_gguf(tiny_hf_model(family, seed=2), family, tmp_path / "m.gguf", "Q8_0")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, 40)]
    outs = []
    for captured in (False, True):
        be = CudaBackend("cuda", dtype=torch.float32)
        eng = LoadPlan.open(path, be, n_ctx=64, n_batch=16, max_rollback=2).engine()
        eng.eval(ids[:8])

        def run(chunk):
            if captured:
                return be.to_numpy(eng.step(chunk))[0]
            return be.to_numpy(eng.forward(chunk, np.arange(len(chunk))))[0]

        rows = []
        for p in range(8, len(ids), 2):
            rows += list(run(ids[p:p + 1]))
            rows += list(run([ids[p + 1], 5, 6]))  # the last two tokens are rejected
            eng.rollback(2)
        outs.append(np.stack(rows))
    assert "not capturable" not in caplog.text
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
