"""Scaled RoPE (linear, Llama 3, YaRN, DeepSeek's YaRN) against transformers on tiny models,
loaded from Hugging Face folders and through GGUF files written by our converter."""

import numpy as np
import pytest

import diptych

from ..tiny_models import logits, save_hf_folder, tiny_hf_model, write_gguf

IDS = [int(i) for i in np.random.default_rng(3).integers(3, 128, 48)]

CASES = {
    "linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 64}),
    "deepseek-yarn": ("deepseek_v2", {"rope_type": "yarn", "rope_theta": 10000.0,
                                      "factor": 40.0, "original_max_position_embeddings": 64,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                      "mscale_all_dim": 1.0}),
}


@pytest.fixture(params=["torch", "mlx"])
def backend_name(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return request.param


@pytest.mark.parametrize("case", CASES)
def test_scaled_rope_matches_transformers(tmp_path, backend_name, case):
    family, rope = CASES[case]
    hf = tiny_hf_model(family, seed=5, rope_parameters=rope, max_position_embeddings=256)
    ref = logits(hf, IDS)
    unscaled = logits(tiny_hf_model(family, seed=5), IDS)
    assert np.abs(unscaled - ref).max() > 1e-2 * np.abs(ref).max()  # the scaling matters
    for source in (save_hf_folder(hf, tmp_path / "hf"), write_gguf(hf, family, tmp_path / "m.gguf")):
        model = diptych.load(source, backend=backend_name, n_ctx=64)
        assert model.config.rope_scaling is not None or case == "llama3"
        ours = model.logits(IDS)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), source
