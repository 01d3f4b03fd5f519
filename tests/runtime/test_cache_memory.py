"""Cache memory: the real sizes of the storage arrays against each cache kind's formula."""

import pytest

from diptych.backends import select
from diptych.inference.cache import KVCache, bytes_per_token
from diptych.load_plan import read_config
from diptych.quant.gguf_file import GGUFFile

from ..tiny_models import tiny_hf_model, write_gguf


@pytest.fixture(params=["torch", "mlx"])
def backend(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return select(request.param)


def _config(path):
    return read_config(GGUFFile(path))


def _storage_bytes(kv) -> int:
    """Bytes of every array the storage holds, counted from the arrays themselves."""
    arrays = [a for a in kv.k + kv.v if a is not None]
    return sum(int(a.nbytes) if hasattr(a, "nbytes") and not hasattr(a, "element_size")
               else a.numel() * a.element_size() for a in arrays)


@pytest.mark.real
def test_gemma3_sliding_window_layers_hold_only_their_window(backend, gemma3_path):
    cfg = _config(gemma3_path)
    el = backend.kv_bytes_per_element()
    n_ctx, n_batch = 4096, 256
    cache = KVCache(backend, cfg, n_ctx, n_batch)
    # Gemma-3-270M: 18 layers, every 6th global; 1 KV head of 256; window 512
    assert (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window) == (18, 1, 256, 512)
    n_global = 3
    kv_token = 2 * 1 * 256 * el  # K and V of one token in one layer
    want = (n_global * n_ctx + (18 - n_global) * (512 - 1 + n_batch)) * kv_token
    assert _storage_bytes(cache.storage) == cache.nbytes == want
    assert KVCache.bytes_needed(cfg, n_ctx, el, n_batch) == want
    assert want < 0.33 * 18 * n_ctx * kv_token  # a full cache in every layer: 3x more
    assert bytes_per_token(cfg, el)[0] == n_global * kv_token


def test_mla_cache_holds_the_latent_and_rope_key_only(backend, tmp_path):
    hf = tiny_hf_model("deepseek_v3")
    cfg = _config(write_gguf(hf, "deepseek_v3", tmp_path / "m.gguf"))
    el = backend.kv_bytes_per_element()
    c = hf.config
    cache = KVCache(backend, cfg, 1024, 64)
    latent = c.kv_lora_rank + c.qk_rope_head_dim  # 32 + 8 values per token and layer
    assert _storage_bytes(cache.storage) == cache.nbytes == c.num_hidden_layers * 1024 * latent * el
    # a full K/V cache of the same model: every head's K (nope + rope) and V
    full = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    assert full / latent == 4.0
    assert cache.nbytes * 4 == c.num_hidden_layers * 1024 * full * el


def test_info_reports_the_cache_kind_and_bytes_per_token(tmp_path, capsys, monkeypatch):
    from diptych.cli.main import main

    monkeypatch.delenv("DIPTYCH_KV_TYPE")  # the default cache users get

    hf = tiny_hf_model("deepseek_v3")
    path = write_gguf(hf, "deepseek_v3", tmp_path / "m.gguf")
    assert main(["info", str(path), "--backend", "torch", "--n-ctx", "1024"]) == 0
    c = hf.config
    per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2  # fp16
    out = capsys.readouterr().out
    assert f"MLA latent cache, 32 + 8 values per token and layer: {per_token} bytes/token" in out
