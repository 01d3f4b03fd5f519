"""LoRA adapters through the graph: pairs on separate and stacked matrices, the no-cache
forward training uses, and the gradients in A and B, against transformers with the same
pairs merged into its weights (W + scale * B A), on every backend."""

import numpy as np
import pytest
import torch

from diptych.load_plan import LoadPlan
from diptych.model.adapters import add_lora
from diptych.model.graph import forward_all

from ..tiny_models import tiny_hf_model, write_gguf

# (layer, target): q, k, v and gate, up sit in stacked matrices of the F32 file
TARGETS = [(0, "q_proj"), (0, "v_proj"), (0, "up_proj"), (1, "k_proj"), (1, "o_proj"),
           (1, "gate_proj"), (1, "down_proj")]
RANK, SCALE = 4, 0.5
IDS = np.random.default_rng(2).integers(3, 128, (2, 10))


@pytest.fixture(params=["torch", "mlx"])
def backend_name(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return request.param


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = tiny_hf_model("llama", seed=5)
    return hf, write_gguf(hf, "llama", tmp_path_factory.mktemp("lora") / "m.gguf")


def _module(target: str) -> str:
    return "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"


def _pairs(hf):
    """Random non-zero (A, B) per target, float32 numpy, in PEFT shapes."""
    rng = np.random.default_rng(7)
    out = []
    for layer, target in TARGETS:
        w = hf.get_submodule(f"model.layers.{layer}.{_module(target)}.{target}").weight
        n, k = w.shape
        out.append((rng.standard_normal((RANK, k)).astype(np.float32) * 0.3,
                    rng.standard_normal((n, RANK)).astype(np.float32) * 0.3))
    return out


def _reference(hf, pairs, g):
    """transformers' logits with W + SCALE * B A, and the gradients of sum(logits * g)."""
    leaves = [(torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True))
              for a, b in pairs]
    params = {}
    for (layer, target), (a, b) in zip(TARGETS, leaves):
        name = f"model.layers.{layer}.{_module(target)}.{target}.weight"
        params[name] = hf.get_parameter(name).detach() + SCALE * b @ a
    out = torch.func.functional_call(hf, params, (torch.tensor(IDS),)).logits
    (out * torch.tensor(g)).sum().backward()
    return out.detach().numpy(), [(a.grad.numpy(), b.grad.numpy()) for a, b in leaves]


def _attach(eng, arrays):
    for layer in eng.weights.layers:
        layer.adapters.clear()
    for (layer, target), (a, b) in zip(TARGETS, arrays):
        add_lora(eng.cfg, eng.weights.layers[layer], target, a, b, SCALE)


def _ours(eng, backend_name, pairs, g):
    """forward_all's logits with the pairs attached, and the gradients in A and B."""
    be = eng.backend
    tokens = be.ids(IDS)
    if backend_name == "torch":
        arrays = [(torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True))
                  for a, b in pairs]
        _attach(eng, arrays)
        out = forward_all(be, eng.cfg, eng.weights, tokens)
        (out * torch.tensor(g)).sum().backward()
        return be.to_numpy(out), [(a.grad.numpy(), b.grad.numpy()) for a, b in arrays]
    import mlx.core as mx

    def loss(flat):
        _attach(eng, list(zip(flat[::2], flat[1::2])))
        out = forward_all(be, eng.cfg, eng.weights, tokens)
        return (out * mx.array(g)).sum(), out

    flat = [mx.array(m) for pair in pairs for m in pair]
    (_, out), grads = mx.value_and_grad(loss)(flat)
    grads = [np.array(x) for x in grads]
    return np.array(out), list(zip(grads[::2], grads[1::2]))


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_adapters_and_their_gradients_match_merged_transformers(llama, backend_name):
    hf, path = llama
    eng = LoadPlan.open(path, backend_name, n_ctx=32).engine()
    assert eng.weights.layers[0].wqkv is not None and eng.weights.layers[0].w_gate_up is not None
    pairs = _pairs(hf)
    g = np.random.default_rng(8).standard_normal((*IDS.shape, 128)).astype(np.float32)
    want, want_grads = _reference(hf, pairs, g)
    got, grads = _ours(eng, backend_name, pairs, g)
    assert _rel(got, want) <= 1e-4
    for (ga, gb), (wa, wb) in zip(grads, want_grads):
        assert _rel(ga, wa) <= 1e-4 and _rel(gb, wb) <= 1e-4
    # the adapters moved the logits, and the engine's cache was never written
    assert _rel(got, np.stack([hf(torch.tensor(IDS)).logits.detach().numpy()])[0]) > 1e-2
    assert eng.n_cached == 0
    assert not np.abs(eng.backend.to_numpy(eng.main.cache.storage.k[0])).any()


def test_add_lora_refuses_what_the_layer_lacks(llama):
    from diptych.errors import InvalidArgumentError

    eng = LoadPlan.open(llama[1], "torch", n_ctx=32).engine()
    layer = eng.weights.layers[0]
    a, b = torch.zeros(RANK, 64), torch.zeros(64, RANK)
    with pytest.raises(InvalidArgumentError, match="no LoRA target"):
        add_lora(eng.cfg, layer, "qkv", a, b, SCALE)
    with pytest.raises(InvalidArgumentError, match="no q_a_proj"):  # an MLA projection
        add_lora(eng.cfg, layer, "q_a_proj", a, b, SCALE)
    with pytest.raises(InvalidArgumentError, match="B has 64 rows"):  # K is 32 rows
        add_lora(eng.cfg, layer, "k_proj", a, b, SCALE)
    assert layer.adapters == {}
    pair = add_lora(eng.cfg, layer, "k_proj", a, b[:32], SCALE)
    assert layer.adapters == {"wqkv": [pair]} and pair.rows == (64, 96)
