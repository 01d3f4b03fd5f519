"""The graph against Hugging Face transformers on tiny random models of every family,
through GGUF files written by our converter, with every cache kind.

Each test runs once per backend: torch, and mlx where it is installed.
"""

import numpy as np
import pytest
import torch

from diptych.load_plan import LoadPlan

from ..tiny_models import FAMILIES, logits, tiny_hf_model, write_gguf

IDS = [int(i) for i in np.random.default_rng(1).integers(3, 128, 40)]  # > 4 windows of 8
WINDOWED = ("mistral", "gemma3")
MOE = ("qwen3moe", "mixtral", "deepseek_v2", "deepseek_v3")


@pytest.fixture(params=["torch", "mlx"])
def backend_name(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return request.param


@pytest.fixture
def engine_for(backend_name):
    def make(path, n_ctx=64, n_batch=256):
        return LoadPlan.open(path, backend_name, n_ctx=n_ctx, n_batch=n_batch).engine()

    return make


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (transformers model, its F32 GGUF, transformers' logits on IDS), built once."""
    made = {}

    def get(family):
        if family not in made:
            hf = tiny_hf_model(family, seed=1)
            path = write_gguf(hf, family, tmp_path_factory.mktemp(family) / "m.gguf")
            made[family] = (hf, path, logits(hf, IDS))
        return made[family]

    return get


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_sequence_logits_match_transformers(tiny, engine_for, family):
    hf, path, ref = tiny(family)
    eng = engine_for(path)
    if family in WINDOWED:
        assert eng.cfg.sliding_window == 8 and any(eng.cfg.window_layers)
    if family.startswith("deepseek"):
        assert eng.cfg.mla is not None
    ours = eng.eval(IDS, all_logits=True)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_full_forward(tiny, engine_for, family):
    """Uneven prefill chunks after a cached prefix, then token-by-token decode, past the
    sliding window: with n_batch 5 a window of 8 lives in a ring of 12 slots that wraps."""
    _, path, ref = tiny(family)
    eng = engine_for(path, n_batch=5)
    if family in WINDOWED:
        assert min(s.slots for s in eng.main.cache.specs if s.window) == 12 < len(IDS)
    part = eng.eval(IDS[:23], all_logits=True)
    steps = [eng.backend.to_numpy(eng.eval([t]))[0] for t in IDS[23:]]
    assert _rel(np.concatenate([part, np.stack(steps)]), ref) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek_v3"])
def test_fp16_cache_stores_half_the_bytes_within_its_rounding(tiny, family, monkeypatch):
    """The torch CPU default (the other tests here run an fp32 cache: tests/conftest.py): K/V
    rounded to fp16 (2^-11 relative) in the cache, attention in fp32. Full, sliding-window
    and MLA caches."""
    monkeypatch.delenv("DIPTYCH_KV_TYPE")
    _, path, ref = tiny(family)
    eng = LoadPlan.open(path, "torch", device="cpu", n_ctx=64, n_batch=5).engine()
    assert eng.backend.kv_bytes_per_element() == 2
    assert eng.main.cache.storage.k[0].dtype == torch.float16
    part = eng.eval(IDS[:23], all_logits=True)
    steps = [eng.backend.to_numpy(eng.eval([t]))[0] for t in IDS[23:]]
    err = _rel(np.concatenate([part, np.stack(steps)]), ref)
    assert 1e-6 < err <= 5e-3


def test_kv_type_is_checked(monkeypatch):
    from diptych.backends import select
    from diptych.errors import InvalidArgumentError

    monkeypatch.setenv("DIPTYCH_KV_TYPE", "q4")
    with pytest.raises(InvalidArgumentError, match="DIPTYCH_KV_TYPE"):
        select("torch", "cpu")
    monkeypatch.setenv("DIPTYCH_KV_TYPE", "F32")
    assert select("torch", "cpu").kv_bytes_per_element() == 4


@pytest.mark.parametrize("family", MOE)
def test_router_choices_are_not_near_ties(tiny, family):
    """The MoE oracles are only meaningful if no token's top-k experts are a near-tie: a
    1e-6 difference would then pick different experts in two correct implementations."""
    hf, _, _ = tiny(family)
    gaps = []

    def hook(module, args):
        x = args[0].reshape(-1, module.weight.shape[1]).float()
        z = x @ module.weight.float().T
        cfg = hf.config
        scores = z.sigmoid() if getattr(cfg, "scoring_func", "softmax") == "sigmoid" else z.softmax(-1)
        if hasattr(module, "e_score_correction_bias"):
            scores = scores + module.e_score_correction_bias
        top = scores.sort(-1, descending=True).values
        k = cfg.num_experts_per_tok
        gaps.append((top[:, k - 1] - top[:, k]).min().item())

    handles = [m.register_forward_pre_hook(hook) for n, m in hf.named_modules()
               if n.endswith("mlp.gate")]
    with torch.no_grad():
        hf(torch.tensor([IDS]))
    for h in handles:
        h.remove()
    assert gaps and min(gaps) > 1e-4, gaps


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3moe", "deepseek_v3"])
def test_f16_gguf_within_its_rounding(tmp_path, engine_for, tiny, family):
    """F16 weights round each weight by <= 2^-11 relative; through two layers the logits
    move by well under 1% of their range (measured: ~1e-3)."""
    hf, _, ref = tiny(family)
    ours = engine_for(write_gguf(hf, family, tmp_path / "m16.gguf", "F16")).eval(
        IDS, all_logits=True)
    assert _rel(ours, ref) <= 5e-3


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "deepseek_v2"])
def test_prefix_reuse_and_rewind_match_a_fresh_cache(tiny, engine_for, family):
    """A second prompt sharing a prefix reuses it; rewinds within the ring's spare slots
    happen in place, longer ones on a wrapped ring re-feed the ids: never wrong keys."""
    _, path, _ = tiny(family)
    eng = engine_for(path, n_batch=4)  # rings of 8 - 1 + 4 = 11 slots
    for a, b in ((IDS[:30], IDS[:27] + [5, 6, 7]),   # back 3 tokens: in place
                 (IDS[:36], IDS[:20] + [9, 10]),      # back 16 on a wrapped ring
                 (IDS[:12], IDS[:12] + IDS[30:34])):  # extend
        eng.prefill(a)
        got = eng.backend.to_numpy(eng.prefill(b))[0]
        assert eng.tokens == b
        want = engine_for(path).eval(b, all_logits=True)[-1]
        assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_keep_prefix_trims_without_feeding_and_never_keeps_wrong_keys(tiny, engine_for, family):
    """keep_prefix (a chat's last turn taken back) keeps the common prefix in place where the
    cache allows it; on a wrapped ring less (a snapshot's length, or nothing). It feeds
    nothing, and what is fed next gives a fresh cache's logits."""
    _, path, _ = tiny(family)
    eng = engine_for(path, n_batch=4)
    eng.prefill(IDS[:36])
    fed = []
    eval_ = eng.main.eval
    eng.main.eval = lambda ids, *a: (fed.append(len(ids)), eval_(ids, *a))[1]
    kept = eng.keep_prefix(IDS[:20] + [9, 10])
    assert fed == [] and eng.n_cached == kept and eng.tokens == IDS[:kept]
    assert kept == 20 if family not in WINDOWED else kept < 20
    got = eng.backend.to_numpy(eng.prefill(IDS[:20] + [9, 10]))[0]
    want = engine_for(path).eval(IDS[:20] + [9, 10], all_logits=True)[-1]
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("family", WINDOWED)
def test_regenerate_and_resend_on_wrapped_rings_use_snapshots(tiny, engine_for, family):
    """Chat turns on a ring of 11 slots: regenerating a 12-token reply re-feeds only the
    prompt's last token (from the snapshot prefill took), and resending after a reply
    resumes from the end of that exchange; every result equals a fresh cache's."""
    _, path, _ = tiny(family)
    eng = engine_for(path, n_batch=4)
    fed = []
    eval_ = eng.main.eval
    eng.main.eval = lambda ids, *a: (fed.append(len(ids)), eval_(ids, *a))[1]

    def check(got, ids):
        assert eng.tokens == ids
        want = engine_for(path).eval(ids, all_logits=True)[-1]
        assert _rel(eng.backend.to_numpy(got)[0], want) <= 1e-5

    prompt, reply = IDS[:20], IDS[20:32]
    eng.prefill(prompt)
    for t in reply:  # "generation"
        eng.eval([t])
    fed.clear()
    check(eng.prefill(prompt), prompt)                # regenerate: back 12 > 8 spare slots
    assert fed == [1]
    for t in reply:
        eng.eval([t])
    fed.clear()
    turn = prompt + reply + IDS[32:40]
    check(eng.prefill(turn), turn)                     # the next turn extends the cache
    assert sum(fed) == 8
    for t in reply:
        eng.eval([t])
    fed.clear()
    resend = prompt + reply + [7, 8, 9]                # edit and resend that turn
    check(eng.prefill(resend), resend)
    assert sum(fed) == 3


@pytest.mark.parametrize("family", WINDOWED)
def test_a_snapshot_before_the_ring_wraps_holds_the_slots_in_use(tiny, engine_for, family):
    """A 6-token prompt on rings of 11 slots: prefill's snapshot (at 5 tokens) copies 5
    slots of each ring, not the ring. A 12-token reply wraps the rings past every spare
    slot; regenerating restores that snapshot, re-feeds the prompt's last token, and gives a
    fresh cache's logits, and so does the reply fed again after it."""
    _, path, _ = tiny(family)
    eng = engine_for(path, n_batch=4)
    main = eng.main
    prompt, reply = IDS[:6], IDS[6:18]
    eng.prefill(prompt)
    (ids, copy), = main.snapshots
    ring = main.cache.specs[copy[0][0]]
    assert ids == prompt[:5] and ring.window and ring.slots == 11
    per_slot = ring.n_kv_heads * ring.k_dim
    assert all(eng.backend.to_numpy(k).size == 5 * per_slot for _, k, _ in copy)
    for t in reply:
        eng.eval([t])
    fed = []
    eval_ = main.eval
    main.eval = lambda ids, *a: (fed.append(len(ids)), eval_(ids, *a))[1]
    got = eng.prefill(prompt)
    assert fed == [1] and eng.tokens == prompt
    want = engine_for(path).eval(prompt, all_logits=True)[-1]
    assert _rel(eng.backend.to_numpy(got)[0], want) <= 1e-5
    for t in reply[:-1]:
        eng.eval([t])
    got = eng.eval([reply[-1]])
    want = engine_for(path).eval(prompt + reply, all_logits=True)[-1]
    assert _rel(eng.backend.to_numpy(got)[0], want) <= 1e-5


def test_moe_without_topk_normalisation(tmp_path, backend_name):
    """Qwen3-MoE with norm_topk_prob=False (transformers' default): the routing weights are
    the raw softmax probabilities of the chosen experts."""
    import diptych

    from ..tiny_models import save_hf_folder

    hf = tiny_hf_model("qwen3moe", seed=1, norm_topk_prob=False)
    model = diptych.load(save_hf_folder(hf, tmp_path / "m"), backend=backend_name, n_ctx=64)
    assert model.config.moe.norm_topk is False
    ref = logits(hf, IDS)
    assert _rel(model.logits(IDS), ref) <= 1e-4
