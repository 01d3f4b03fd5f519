"""CudaBackend wired end to end: tiny quantized models through the graph, every Triton kernel
on the way (under the interpreter on the CPU), against the CPU backend on the same file."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from diptych.backends.torch import TorchBackend
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.cuda.backend import CudaBackend, DenseWeight
from diptych.backends.torch.cuda.kernels import attention as attn
from diptych.backends.torch.cuda.kernels.weight import QuantExperts, QuantWeight
from diptych.errors import BackendUnavailableError, InvalidArgumentError
from diptych.load_plan import LoadPlan

from ...tiny_models import tiny_hf_model, write_gguf
from .blocks import KERNEL_TYPES, cols_for, make_weight
from .conftest import DEVICE


def _engines(path, n_ctx, n_batch):
    return [LoadPlan.open(path, be, n_ctx=n_ctx, n_batch=n_batch).engine()
            for be in (CpuBackend(), CudaBackend(DEVICE, dtype=torch.float32))]


def _run(eng, chunks):
    """Logits of every position: `chunks` fed one eval call each."""
    rows = [eng.eval(c, all_logits=True) for c in chunks]
    return np.concatenate(rows)


@pytest.mark.parametrize("family,qtype,n_batch,chunks", [
    # 12- and 9-token chunks (SDPA, causal and after a prefix), single-token decode, a
    # 4-token verification step
    ("llama", "Q8_0", 16, [12, 9, 1, 4]),
    ("qwen2", "Q4_0", 16, [12, 1, 4]),  # qkv biases
    # window 8 over a 13-slot ring that wraps; every step on the decode kernels
    ("mistral", "Q5_0", 6, [6, 6, 6, 1, 1]),
    ("deepseek_v2", "Q8_0", 16, [10, 1, 3]),  # MLA in latent space (and MoE)
])
def test_logits_match_cpu_backend(tmp_path, monkeypatch, family, qtype, n_batch, chunks):
    path = write_gguf(tiny_hf_model(family, seed=1), family, tmp_path / "m.gguf", qtype)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, sum(chunks))]
    split = np.split(ids, np.cumsum(chunks)[:-1])
    ref_eng, eng = _engines(path, 32, n_batch)
    assert any(isinstance(w, QuantWeight) for _, w in eng.weights.linears())
    used = []  # which decode attention kernels ran, and whether with explicit key positions
    for name in ("decode_attention", "mla_decode_attention"):
        fn = getattr(attn, name)
        monkeypatch.setattr(attn, name, lambda *a, _f=fn, _n=name, **k: (
            used.append((_n, k.get("slot_pos") is not None)), _f(*a, **k))[1])
    ref = _run(ref_eng, [list(c) for c in split])
    got = _run(eng, [list(c) for c in split])
    assert np.abs(got - ref).max() <= 2e-4 * np.abs(ref).max()
    want = {"mistral": ("decode_attention", True),  # the ring's slots: explicit positions
            "deepseek_v2": ("mla_decode_attention", False)}.get(family,
                                                                ("decode_attention", False))
    assert want in used


def test_weights_without_kernel_are_dequantized_with_a_warning(caplog):
    be = CudaBackend(DEVICE, dtype=torch.float32)
    qt = make_weight(T.Q3_K, 4, 256)
    with caplog.at_level(logging.WARNING):
        w = be.prepare(qt)
    assert isinstance(w, DenseWeight) and "Q3_K" in caplog.text and qt.name in caplog.text
    assert "dequantized at load" in be.weight_layout(w)
    x = torch.randn(2, 1, 256, device=DEVICE)
    want = x.double().cpu() @ torch.from_numpy(qt.dequantize()).double().T
    torch.testing.assert_close(be.linear(x, w).double().cpu(), want, rtol=1e-5, atol=1e-5)
    q8 = be.prepare(make_weight(T.Q8_0, 4, 64))
    assert isinstance(q8, QuantWeight) and be.weight_bytes(q8) == 4 * 2 * 34


def test_cpu_device_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        CudaBackend("cpu")


def test_compile_step_is_identity_off_cuda():
    be = CudaBackend("cpu") if DEVICE == "cpu" else None
    if be is None:
        pytest.skip("on CUDA the step is captured (test_graph_step_replays_eager_results)")

    def fn(x):
        return x

    assert be.compile_step(fn) is fn


def test_select_picks_cuda_backend_when_cuda_is_present(monkeypatch):
    import diptych.backends.torch.cuda.backend as cuda_mod
    from diptych.backends import select

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_mod, "CudaBackend", lambda device: f"cuda backend on {device}")
    assert select("torch") == "cuda backend on cuda"
    assert select("torch", device="cuda:1") == "cuda backend on cuda:1"
    on_cpu = select("torch", device="cpu")  # torch on the CPU although CUDA is present
    assert isinstance(on_cpu, CpuBackend) and on_cpu.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(select("torch"), CpuBackend)
    assert isinstance(select("torch"), TorchBackend)


@pytest.mark.parametrize("device", ["gpu", "cuda0", "metal", 0])
def test_select_refuses_unknown_devices(device):
    from diptych.backends import select

    with pytest.raises(InvalidArgumentError, match="unknown device"):
        select("torch", device=device)


@pytest.mark.parametrize("window", [0, 4])
def test_gradients_match_cpu_backend(window):
    """Training path: grad_x through a quantized linear, RMSNorm, RoPE and attention."""
    from diptych.backends.base import LayerCacheSpec, RopeSpec, Step
    from diptych.inference.slots import SlotPolicy

    g = torch.Generator().manual_seed(0)
    qt = make_weight(T.Q4_K, 24, 256)
    x0 = torch.randn(1, 5, 256, generator=g)
    h0 = torch.randn(1, 5, 4, 16, generator=g)
    nw = torch.randn(256, generator=g)
    grads = []
    for be in (CpuBackend(), CudaBackend(DEVICE, dtype=torch.float32)):
        x = x0.clone().to(be.device).requires_grad_()
        q = h0.clone().to(be.device).requires_grad_()
        pos = be.ids(np.arange(5)[None])
        y = be.linear(be.rms_norm(x, be.prepare_vector(nw.numpy()), 1e-5), be.prepare(qt))
        y = y * 0.02  # scores of order 1: a well-conditioned softmax
        k = be.rope(y[..., :16].reshape(1, 5, 1, 16).expand(1, 5, 2, 16), pos, RopeSpec(16, 1e4))
        v = y[..., 8:24].reshape(1, 5, 1, 16).expand(1, 5, 2, 16)
        kv = be.alloc_kv([LayerCacheSpec(8, 2, 16, window=window)], 1)
        slots = SlotPolicy(kv.specs)
        step = Step(pos, 5, slots.views(slots.arrays(be, 0, 5), 0, 5))
        out = be.attention(be.rope(q, pos, RopeSpec(16, 1e4)), k, v, kv, 0, step, 0.25)
        (out.float() ** 2).sum().backward()
        grads.append((x.grad.cpu(), q.grad.cpu()))
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


# aten ops whose result depends on a tensor's values read on the host: a device sync
HOST_READS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "masked_select",
              "equal", "is_nonzero"}


def _host_reads(fn) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen & HOST_READS


@pytest.mark.parametrize("qtype", ["Q8_0", "F32"])
def test_moe_decode_step_reads_nothing_on_the_host(tmp_path, qtype):
    """MoE routing stays on the device: the CUDA backend's decode step of an MoE model
    (sigmoid scores, selection bias, group-limited choice) dispatches no op that reads a
    value on the host, so it can be captured as a CUDA graph (quantized experts: picked by
    id in the GEMV; dense ones: every expert, weighted); the CPU backend, which runs only
    the experts present, does read them."""
    path = write_gguf(tiny_hf_model("deepseek_v3", seed=1), "deepseek_v3", tmp_path / "m.gguf",
                      qtype)
    ids = [5, 17, 3, 99, 42]
    ref_eng, eng = _engines(path, 16, 8)
    assert isinstance(eng.weights.layers[1].experts.gate, QuantExperts) == (qtype == "Q8_0")
    logits = {}
    for e in (ref_eng, eng):
        e.eval(ids)
    assert _host_reads(lambda: logits.setdefault("cpu", ref_eng.eval([7])))
    assert _host_reads(lambda: logits.setdefault("cuda", eng.eval([7]))) == set()
    ref, got = (e.backend.to_numpy(logits[k]) for e, k in ((ref_eng, "cpu"), (eng, "cuda")))
    assert np.abs(got - ref).max() <= 2e-4 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [*KERNEL_TYPES, T.Q3_K, T.F32], ids=lambda t: t.name)
def test_linear_with_adapters_and_gradients(qtype):
    """The training branch of linear with LoRA pairs: the kernel types through
    _QuantLinearFn (grad_x from dequantized tiles), Q3_K and F32 as dense weights; output
    and gradients in x, A and B against a dense float64 reference."""
    from diptych.quant import QuantTensor

    from ..adapter_reference import check_torch_backend

    if qtype == T.F32:
        values = np.random.default_rng(3).standard_normal((24, 96)).astype(np.float32)
        qt = QuantTensor("w", T.F32, values.shape, values.view(np.uint8))
    else:
        qt = make_weight(qtype, 24, cols_for(qtype))
    check_torch_backend(CudaBackend(DEVICE, dtype=torch.float32), qt, qt.dequantize())
