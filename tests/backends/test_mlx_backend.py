"""The MLX backend against Hugging Face transformers on tiny random models, and its sampler.

Mirrors tests/runtime/test_graph_oracle.py and tests/runtime/test_sampling.py with the
Engine built on MLXBackend directly (MLX's CPU build on Linux; float32 activations).
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from diptych.backends.mlx import MLXBackend, MLXKV  # noqa: E402
from diptych.engine import Engine  # noqa: E402
from diptych.families import config_from_gguf  # noqa: E402
from diptych.generate import stream_tokens  # noqa: E402
from diptych.quant.gguf_file import GGUFFile  # noqa: E402
from diptych.sampling import SamplingParams  # noqa: E402
from diptych.weights import load_weights  # noqa: E402

from ..tiny_models import tiny_hf_model, write_gguf  # noqa: E402


def engine_for(path, n_ctx=64, n_batch=256):
    f = GGUFFile(path)
    cfg = config_from_gguf(f.metadata, {n: t.shape for n, t in f.tensors.items()})
    be = MLXBackend()
    return Engine(be, cfg, load_weights(f.tensors, cfg, be), n_ctx, n_batch)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return write_gguf(tiny_hf_model("llama", seed=3), "llama",
                      tmp_path_factory.mktemp("mlx") / "m.gguf")


def test_backend_describes_itself():
    be = MLXBackend()
    assert be.name == "mlx" and be.device in ("cpu", "gpu")
    if be.device == "cpu":
        assert be.dtype == mx.float32 and be.kv_bytes_per_element() == 4


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_full_sequence_logits_match_transformers(tmp_path, arch, tied):
    hf = tiny_hf_model(arch, tied=tied)
    ids = list(np.random.default_rng(1).integers(0, 128, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    eng = engine_for(write_gguf(hf, arch, tmp_path / "m.gguf"))
    ours = eng.eval(ids, all_logits=True)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bfloat16_path_on_the_cpu(llama_path):
    """bf16 activations, scales and weights (a Metal configuration) run on the CPU too."""
    hf = tiny_hf_model("llama", seed=3)
    ids = list(np.random.default_rng(1).integers(0, 128, 24))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    f = GGUFFile(llama_path)
    cfg = config_from_gguf(f.metadata, {n: t.shape for n, t in f.tensors.items()})
    be = MLXBackend(dtype="bfloat16", scale_dtype="bfloat16")
    eng = Engine(be, cfg, load_weights(f.tensors, cfg, be), 32, 256)
    assert eng.cache.storage.k[0].dtype == mx.bfloat16 and be.kv_bytes_per_element() == 2
    ours = eng.eval(ids, all_logits=True)
    # bf16 keeps 8 significant bits: measured max error ~7% of max|logit|, top-1 ~95%
    assert np.abs(ours - ref).max() <= 0.15 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.85


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_and_decode_match_full_forward(tmp_path, arch):
    hf = tiny_hf_model(arch, seed=3)
    ids = list(np.random.default_rng(2).integers(0, 128, 30))
    path = write_gguf(hf, arch, tmp_path / "m.gguf")
    full = engine_for(path).eval(ids, all_logits=True)

    eng = engine_for(path, n_batch=7)  # prefill in uneven chunks after a cached prefix
    part = eng.eval(ids[:20], all_logits=True)
    steps = [eng.backend.to_numpy(eng.eval([t]))[0] for t in ids[20:]]
    ours = np.concatenate([part, np.stack(steps)])
    assert np.abs(ours - full).max() <= 1e-4 * np.abs(full).max()


def test_prefill_reuses_common_prefix_and_rewinds(llama_path):
    eng = engine_for(llama_path)
    a = [5, 6, 7, 8, 9, 10]
    b = [5, 6, 7, 20, 21]
    eng.prefill(a)
    got = eng.backend.to_numpy(eng.prefill(b))[0]
    assert eng.cache.tokens == b
    want = engine_for(llama_path).eval(b, all_logits=True)[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_kv_storage_reports_its_real_size(llama_path):
    eng = engine_for(llama_path, n_ctx=48)
    kv = eng.cache.storage
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


# -- sampler --------------------------------------------------------------------------

def draw(logits, n=2000, history=(), seed=0, **kw):
    be = MLXBackend()
    params = SamplingParams(**kw)
    rng = be.new_rng(seed)
    x = mx.array(np.array([logits], dtype=np.float32))
    hist = be.ids(list(history))
    return np.bincount([be.sample(x, params, hist, rng) for _ in range(n)],
                       minlength=len(logits))


def test_greedy_is_argmax():
    assert draw([0.1, 3.0, 2.9, -1.0], n=5, temperature=0)[1] == 5


def test_top_k_keeps_only_k_tokens():
    counts = draw([1.0, 0.9, 0.8, 0.7, 0.6], temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_top_p_cuts_the_tail():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.05


def test_top_k_then_top_p_sees_the_renormalised_top_k():
    # top-k=2 leaves (0.4, 0.35) -> renormalised 0.533, 0.467: top_p=0.5 keeps only the first
    logits = np.log([0.4, 0.35, 0.25])
    counts = draw(list(logits), n=300, temperature=1.0, top_k=2, top_p=0.5, min_p=0.0)
    assert counts[0] == 300


def test_min_p_drops_tokens_below_fraction_of_the_best():
    logits = np.log([0.6, 0.3, 0.05, 0.05])
    counts = draw(list(logits), temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert counts[2:].sum() == 0


def test_temperature_sharpens_and_flattens():
    logits = [1.0, 0.0]
    cold = draw(logits, temperature=0.25, top_k=0, top_p=1.0, min_p=0.0)
    hot = draw(logits, temperature=4.0, top_k=0, top_p=1.0, min_p=0.0)
    assert cold[0] / cold.sum() > 0.95 and 0.5 < hot[0] / hot.sum() < 0.65


def test_sampled_frequencies_follow_the_distribution():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    counts = draw(list(np.log(p)), n=4000, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert np.abs(counts / counts.sum() - p).max() < 0.03


def test_repetition_penalty_demotes_seen_tokens():
    logits = [2.0, 1.9, -1.0]
    assert draw(logits, n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1
    assert draw([-1.0, -1.2], n=1, history=[0], temperature=0, repetition_penalty=1.5)[1] == 1
    # a repeated id is penalised once, and only the last penalty_last_n ids count
    assert draw([2.0, 1.5], n=1, history=[0, 0, 0], temperature=0,
                repetition_penalty=1.2)[0] == 1
    assert draw(logits, n=1, history=[0, 2, 2], temperature=0, repetition_penalty=1.5,
                penalty_last_n=2)[0] == 1


def test_presence_penalty_subtracts():
    assert draw([2.0, 1.5], n=1, history=[0], temperature=0, presence_penalty=1.0)[1] == 1


def test_seed_reproduces_and_differs():
    be = MLXBackend()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    x = mx.random.normal((1, 1000), key=mx.random.key(1))
    runs = []
    for seed in (7, 7, 8):
        rng = be.new_rng(seed)
        runs.append([be.sample(x, params, None, rng) for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1 and runs[0] != runs[2]


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
        ref.cache.rewind(0)
    assert ids == seq[3:]
