"""The graph against Hugging Face transformers on tiny random llama and qwen2 models.

Each test runs once per backend: torch, and mlx where it is installed.
"""

import numpy as np
import pytest
import torch

from diptych.backends import select
from diptych.engine import Engine
from diptych.families import config_from_gguf
from diptych.quant.gguf_file import GGUFFile
from diptych.weights import load_weights

from ..tiny_models import tiny_hf_model, write_gguf


@pytest.fixture(params=["torch", "mlx"])
def backend_name(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return request.param


@pytest.fixture
def engine_for(backend_name):
    def make(path, n_ctx=64, n_batch=256):
        f = GGUFFile(path)
        cfg = config_from_gguf(f.metadata, {n: t.shape for n, t in f.tensors.items()})
        be = select(backend_name)
        return Engine(be, cfg, load_weights(f.tensors, cfg, be), n_ctx, n_batch)

    return make


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_full_sequence_logits_match_transformers(tmp_path, engine_for, arch, tied):
    hf = tiny_hf_model(arch, tied=tied)
    ids = list(np.random.default_rng(1).integers(0, 128, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    eng = engine_for(write_gguf(hf, arch, tmp_path / "m.gguf"))
    ours = eng.eval(ids, all_logits=True)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_and_decode_match_full_forward(tmp_path, engine_for, arch):
    hf = tiny_hf_model(arch, seed=3)
    ids = list(np.random.default_rng(2).integers(0, 128, 30))
    path = write_gguf(hf, arch, tmp_path / "m.gguf")
    full = engine_for(path).eval(ids, all_logits=True)

    eng = engine_for(path, n_batch=7)  # prefill in uneven chunks after a cached prefix
    part = eng.eval(ids[:20], all_logits=True)
    steps = [eng.backend.to_numpy(eng.eval([t]))[0] for t in ids[20:]]
    ours = np.concatenate([part, np.stack(steps)])
    assert np.abs(ours - full).max() <= 1e-4 * np.abs(full).max()


def test_prefill_reuses_common_prefix_and_rewinds(tmp_path, engine_for):
    hf = tiny_hf_model("llama", seed=5)
    path = write_gguf(hf, "llama", tmp_path / "m.gguf")
    eng = engine_for(path)
    a = [5, 6, 7, 8, 9, 10]
    b = [5, 6, 7, 20, 21]
    eng.prefill(a)
    got = eng.backend.to_numpy(eng.prefill(b))[0]
    assert eng.cache.tokens == b
    want = engine_for(path).eval(b, all_logits=True)[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
