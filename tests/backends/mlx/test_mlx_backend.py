"""MLX-specific checks (MLX's CPU build on Linux; float32 activations).

The generic graph and sampler tests run on mlx too, parametrized over backends in
tests/runtime/test_graph_oracle.py and tests/runtime/test_sampling.py.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from diptych.backends.mlx import MLXBackend, MLXKV  # noqa: E402
from diptych.backends.mlx.repack import EXACT_BITS, REQUANT_BITS  # noqa: E402
from diptych.inference.generate import stream_tokens  # noqa: E402
from diptych.inference.sampling import SamplingParams  # noqa: E402
from diptych.load_plan import LoadPlan  # noqa: E402

from ...tiny_models import tiny_hf_model, write_gguf  # noqa: E402


def engine_for(path, n_ctx=64, n_batch=256, backend=None):
    return LoadPlan.open(path, backend or MLXBackend(), n_ctx=n_ctx, n_batch=n_batch).engine()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return write_gguf(tiny_hf_model("llama", seed=3), "llama",
                      tmp_path_factory.mktemp("mlx") / "m.gguf")


def test_backend_describes_itself():
    be = MLXBackend()
    assert be.name == "mlx" and be.device in ("cpu", "gpu")
    if be.device == "cpu":
        assert be.dtype == mx.float32 and be.kv_bytes_per_element() == 4


def test_bfloat16_path_on_the_cpu(llama_path):
    """bf16 activations, scales and weights (a Metal configuration) run on the CPU too."""
    hf = tiny_hf_model("llama", seed=3)
    ids = list(np.random.default_rng(1).integers(0, 128, 24))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    be = MLXBackend(dtype="bfloat16", scale_dtype="bfloat16")
    eng = engine_for(llama_path, n_ctx=32, backend=be)
    assert eng.main.cache.storage.k[0].dtype == mx.bfloat16 and be.kv_bytes_per_element() == 2
    ours = eng.eval(ids, all_logits=True)
    # bf16 keeps 8 significant bits: measured max error ~7% of max|logit|, top-1 ~95%
    assert np.abs(ours - ref).max() <= 0.15 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.85


def test_kv_storage_reports_its_real_size(llama_path):
    eng = engine_for(llama_path, n_ctx=48)
    kv = eng.main.cache.storage
    assert isinstance(kv, MLXKV)
    cfg = eng.cfg
    assert kv.nbytes == sum(a.size * a.itemsize for a in kv.k + kv.v)
    assert kv.nbytes == cfg.n_layers * 2 * 48 * cfg.n_kv_heads * cfg.head_dim * 4


def test_rope_matches_float64_tables_at_long_positions():
    from diptych.backends.base import RopeSpec

    be = MLXBackend()
    spec = RopeSpec(dim=12, theta=10000.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 2, 16)).astype(np.float32)
    start = np.array([[4000], [9]])
    pos = start + np.arange(3)[None, :]
    got = np.array(be.rope(mx.array(x), be.ids(pos), spec))
    inv = 1.0 / spec.theta ** (np.arange(0, 12, 2) / 12)
    ang = pos[:, :, None, None] * inv
    x1, x2 = x[..., :6].astype(np.float64), x[..., 6:12].astype(np.float64)
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang),
                           x[..., 12:]], axis=-1)
    # MLX computes the angle in float32: error ~ position * 2^-24 at most
    assert np.abs(got - want).max() < 5e-3


def test_generation_streams_on_mlx(llama_path):
    class Tok:  # the smallest tokenizer stream_tokens needs
        eog_ids = set()

        def is_special(self, token_id):
            return False

        def token_bytes(self, token_id):
            return b"x"

    eng = engine_for(llama_path)
    greedy = SamplingParams(temperature=0)
    pieces = list(stream_tokens(eng, Tok(), [1, 2, 3], 5, greedy))
    ids = [p.token_ids[0] for p in pieces]
    # greedy continuation equals the argmax of full forwards
    ref = engine_for(llama_path)
    seq = [1, 2, 3]
    for _ in range(5):
        seq.append(int(np.argmax(ref.eval(seq, all_logits=True)[-1])))
        ref.reset()
    assert ids == seq[3:]


def test_moe_decode_step_compiles_whole(tmp_path):
    """MoE routing stays on the device: an MoE decode step (sigmoid scores, selection
    bias, group-limited choice) traces under mx.compile, which refuses any value read on
    the host, and gives the eager step's logits."""
    path = write_gguf(tiny_hf_model("deepseek_v3", seed=1), "deepseek_v3", tmp_path / "m.gguf")
    ids = [5, 17, 3, 99, 42]
    eager, traced = engine_for(path), engine_for(path)
    for eng in (eager, traced):
        eng.eval(ids)
    want = np.array(eager.eval([7]))[0]

    seq, be, start = traced.main, traced.backend, len(ids)
    slot_arrays = seq.slots.arrays(be, start, 1)

    def step(tokens, positions, *given):  # the sequence's capturable step, slots as inputs
        rest = iter(given)
        arrays = [None if a is None else next(rest) for a in slot_arrays]
        return seq._run(start, tokens, positions, *arrays)

    present = [a for a in slot_arrays if a is not None]
    got = np.array(mx.compile(step)(be.ids([[7]]), be.ids([[start]]), *present)[0, -1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("ggml_type", [*EXACT_BITS, *REQUANT_BITS, T.F32, T.F16],
                         ids=lambda t: t.name)
def test_linear_with_adapters_and_gradients(ggml_type):
    """linear with LoRA pairs (one on a row range, as on a stacked matrix) and its gradients
    in x, A and B through MLX's autodiff, against a dense float64 reference on the weight
    the backend holds (the requantized types hold their repacked values)."""
    from diptych.backends.base import LoRA

    from ..adapter_reference import GRAD_OF, adapter_case, assert_close, reference
    from .test_mlx_repack import dense_tensor, random_tensor

    be = MLXBackend()
    qt = (dense_tensor(ggml_type, cols=96) if ggml_type in (T.F32, T.F16)
          else random_tensor(ggml_type, rows=24, cols=256, scale=0.05))
    base = be.prepare(qt)
    case, pairs = adapter_case(*qt.shape)
    want, want_grads = reference(case, np.array(base.dequantize()), pairs)
    args = [mx.array(case[name].astype(np.float32)) for name in GRAD_OF]
    g = mx.array(case["g"].astype(np.float32))

    def loss(x, a1, b1, a2, b2):
        y = be.linear(x, base, adapter=[LoRA(a1, b1, pairs[0][0]), LoRA(a2, b2, *pairs[1])])
        return (y * g).sum(), y

    (_, y), grads = mx.value_and_grad(loss, argnums=tuple(range(5)))(*args)
    assert_close(np.array(y), want)
    for name, got in zip(GRAD_OF, grads):
        assert_close(np.array(got), want_grads[name])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_experts_match_the_torch_backend(tmp_path, qtype):
    """Stacked quantized experts through mx.gather_qmm (exact repacks of these types) give
    the torch CPU backend's logits on the same file, prefill and decode."""
    path = write_gguf(tiny_hf_model("qwen3moe", seed=1), "qwen3moe", tmp_path / "m.gguf", qtype)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 128, 12)]
    eng, ref = engine_for(path), LoadPlan.open(path, "torch", n_ctx=64).engine()
    assert eng.weights.layers[0].experts.gate.quantized
    got = np.concatenate([eng.eval(ids[:9], all_logits=True),
                          *(np.array(eng.eval([t])) for t in ids[9:])])
    want = ref.eval(ids, all_logits=True)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
