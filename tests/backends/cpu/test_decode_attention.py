"""The CPU decode-attention kernels (the serial one for short caches and the thread-pool one
for long caches, both forced on every case) against torch SDPA in fp32 over the same cache
values, and the cache write against torch's indexing.

Both sides read the same stored keys and values (the reference converts them to fp32 first),
so the only differences are fp32 summation order and the kernel's exp polynomial (within
3 ulp): the errors seen are 1e-7 to 2e-6 on outputs of order 0.1-1. TOL = 2e-5 leaves
room for that at 2048 keys; one key too many or too few, a wrong head or block weighting
moves outputs by far more (scripts/mutation_check.py, "decode attention").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diptych.backends import select
from diptych.backends.base import CacheView, LayerCacheSpec, Step
from diptych.backends.torch.backend import TorchBackend
from diptych.backends.torch.cpu import decode_attention
from diptych.inference.slots import slot_positions, visible

TOL = 2e-5


@pytest.fixture(params=["serial", "parallel"], autouse=True)
def kernel_path(request, monkeypatch):
    """Every case on both kernels: MIN_KEYS past any cache here (serial), or 0 (parallel)."""
    monkeypatch.setattr(decode_attention, "MIN_KEYS", 10**9 if request.param == "serial" else 0)
    return request.param


def _attend(q, kc, vc, spec, end, scale):
    """decode_attention.attend over torch cache buffers (through their `stored` views), for
    q's T positions ending at position end - 1, the step's arrays as the slot policy
    gives them."""
    stored = decode_attention.stored
    positions = torch.arange(end - q.shape[1], end).expand(q.shape[0], -1)
    key_pos = (torch.from_numpy(slot_positions(spec, end)).expand(q.shape[0], -1)
               if spec.window else None)
    return decode_attention.attend(q, stored(kc), None if vc is None else stored(vc), spec,
                                   positions, key_pos, scale)


def _reference(q, kc, vc, n_keys, allowed, scale, v_dim):
    """SDPA in fp32 over the first n_keys slots, K/V repeated per query head, an explicit
    (T, n_keys) bool mask."""
    group = q.shape[2] // kc.shape[1]
    keys = kc[:, :, :n_keys].float().repeat_interleave(group, 1)
    values = (vc if vc is not None else kc)[:, :, :n_keys, :v_dim].float()
    values = values.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                         attn_mask=torch.from_numpy(allowed), scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _cache(batch, n_kv, slots, d, dtype, gen):
    return torch.randn(batch, n_kv, slots, d, generator=gen).to(dtype)


def _allowed(view: CacheView, n: int) -> np.ndarray:
    """The view's mask as an explicit (T, n_keys) bool array."""
    if view.mask is None:
        return np.ones((n, view.n_keys), dtype=bool)
    if isinstance(view.mask, str):
        return np.tri(n, view.n_keys, view.n_keys - n, dtype=bool)
    return view.mask


CASES = [  # (heads, kv heads, head dim, tokens written, queries)
    (9, 3, 64, 256, 1),      # SmolLM2's shape, GQA 3
    (14, 2, 64, 2048, 1),    # Qwen2.5-0.5B's, GQA 7, a long context
    (4, 4, 128, 300, 1),     # GQA 1, head dim 128, a partial last block
    (7, 1, 256, 129, 1),     # GQA 7 over one KV head, head dim 256
    (9, 3, 64, 200, 3),      # a causal verification step
    (6, 2, 128, 5, 4),       # fewer keys than one block of four
    (9, 3, 64, 1500, 9),     # the widest verify step, over a long cache
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads,n_kv,d,end,n", CASES)
def test_full_cache_matches_sdpa(heads, n_kv, d, end, n, dtype):
    gen = torch.Generator().manual_seed(heads * 1000 + end)
    spec = LayerCacheSpec(end + 7, n_kv, d)  # spare slots past the last written one
    kc, vc = _cache(2, n_kv, spec.slots, d, dtype, gen), _cache(2, n_kv, spec.slots, d, dtype, gen)
    q = torch.randn(2, n, heads, d, generator=gen)
    n_keys, mask = visible(spec, end - n, end)
    view = CacheView(None, None, n_keys, mask)
    out = _attend(q, kc, vc, spec, end, d ** -0.5)
    ref = _reference(q, kc, vc, n_keys, _allowed(view, n), d ** -0.5, d)
    assert out.shape == (2, n, heads * d)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("heads,n_kv,end,n", [(6, 2, 8, 1), (6, 2, 37, 1), (9, 3, 300, 1),
                                              (4, 1, 41, 3), (7, 1, 40, 4)])
def test_sliding_window_ring_matches_sdpa(heads, n_kv, end, n):
    """A window of 8 (and 256) in a ring with spare slots, before and after it wraps: the
    view's mask picks the slots whose positions are inside each query's window."""
    window = 256 if end > 256 else 8
    spec = LayerCacheSpec(window - 1 + 5, n_kv, 64, window=window)
    gen = torch.Generator().manual_seed(end)
    kc = _cache(1, n_kv, spec.slots, 64, torch.float16, gen)
    vc = _cache(1, n_kv, spec.slots, 64, torch.float16, gen)
    q = torch.randn(1, n, heads, 64, generator=gen)
    n_keys, mask = visible(spec, end - n, end)
    if end > window:
        assert isinstance(mask, np.ndarray) and not mask.all()  # the ring has wrapped
        assert (slot_positions(spec, end) < end - window).any()
    view = CacheView(None, None, n_keys, mask)
    out = _attend(q, kc, vc, spec, end, 0.125)
    ref = _reference(q, kc, vc, n_keys, _allowed(view, n), 0.125, 64)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2])
def test_mla_values_are_the_first_channels_of_the_keys(n):
    """One latent KV head for all query heads (deepseek's absorbed attention): keys of
    kv_lora + rope channels, values their first kv_lora."""
    kv_lora, rope, heads, end = 64, 16, 8, 150
    spec = LayerCacheSpec(end, 1, kv_lora + rope, v_from_k=kv_lora)
    gen = torch.Generator().manual_seed(n)
    kc = _cache(1, 1, end, kv_lora + rope, torch.float16, gen)
    q = torch.randn(1, n, heads, kv_lora + rope, generator=gen)
    n_keys, mask = visible(spec, end - n, end)
    view = CacheView(None, None, n_keys, mask)
    out = _attend(q, kc, None, spec, end, 0.1)
    ref = _reference(q, kc, None, n_keys, _allowed(view, n), 0.1, kv_lora)
    assert out.shape == (1, n, heads * kv_lora)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_large_scores_do_not_overflow():
    """Scores far from zero (keys scaled by 40): the softmax subtracts each block's maximum
    and the blocks are rescaled to the common one, as SDPA does."""
    gen = torch.Generator().manual_seed(3)
    spec = LayerCacheSpec(400, 2, 64)
    kc = (_cache(1, 2, 400, 64, torch.float32, gen) * 40).half()
    vc = _cache(1, 2, 400, 64, torch.float16, gen)
    q = torch.randn(1, 1, 6, 64, generator=gen)
    view = CacheView(None, None, 400, None)
    out = _attend(q, kc, vc, spec, 400, 0.125)
    ref = _reference(q, kc, vc, 400, _allowed(view, 1), 0.125, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_writes_what_torch_indexing_writes(dtype):
    """Keys and values of a (B, T) step into their slots, fp32 -> fp16 rounded as torch's
    .to(float16) rounds (ties, overflow to inf, subnormals), from strided views."""
    gen = torch.Generator().manual_seed(5)
    kc, vc = torch.zeros(2, 3, 16, 8, dtype=dtype), torch.zeros(2, 3, 16, 8, dtype=dtype)
    ref_k, ref_v = kc.clone(), vc.clone()
    kv = torch.randn(2, 3, 3, 16, generator=gen) * 1e-3
    kv[0, 0, 0, :4] = torch.tensor([7e4, -1e5, 1e-7, 2049.0])  # inf, -inf, subnormal, a tie
    k, v = kv[..., :8], kv[..., 8:]  # strided views, as slices of a fused projection
    slots = torch.tensor([[4, 9, 2], [15, 0, 7]])
    decode_attention.store(k, v, decode_attention.stored(kc), decode_attention.stored(vc), slots)
    for b in range(2):
        ref_k[b, :, slots[b]] = k[b].transpose(0, 1).to(dtype)
        ref_v[b, :, slots[b]] = v[b].transpose(0, 1).to(dtype)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    with pytest.raises(IndexError):
        decode_attention.store(k, v, decode_attention.stored(kc), None, slots + 1)
    with pytest.raises(ValueError):
        decode_attention.store(kv[:, :, :2], None, decode_attention.stored(kc), None, slots)


def test_the_thread_pool_takes_long_caches_only(monkeypatch, kernel_path):
    """Below MIN_KEYS visible slots attention runs on the calling thread (a fork-join per
    layer costs more than a short cache's work), from MIN_KEYS on on numba's pool."""
    monkeypatch.undo()
    taken = []
    for name in ("_attend", "_attend_serial"):
        kernel = getattr(decode_attention, name)
        monkeypatch.setattr(decode_attention, name,
                            type("K", (), {"__call__": staticmethod(
                                lambda *a, k=kernel, n=name: taken.append(n) or k(*a))})())
    long = decode_attention.MIN_KEYS
    spec = LayerCacheSpec(long + 8, 2, 64)
    kc = torch.randn(1, 2, long + 8, 64).half()
    q = torch.randn(1, 1, 4, 64)
    for keys, kernel in ((long - 1, "_attend_serial"), (long, "_attend"), (7, "_attend_serial")):
        taken.clear()
        out = _attend(q, kc, kc, spec, keys, 0.125)
        assert taken == [kernel]
        ref = _reference(q, kc, kc, keys, np.ones((1, keys), bool), 0.125, 64)
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_the_cpu_backend_takes_decode_widths_and_leaves_the_rest_to_sdpa(monkeypatch):
    """CpuBackend.attention: steps of up to MAX_QUERIES positions under inference mode (the
    engine's) write the cache and attend through the kernels; wider steps and training's
    passes go to TorchBackend's indexing and SDPA. Both leave the same cache and output."""
    be = select("torch", "cpu")
    calls, kernel = [], decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *a: calls.append(1) or kernel(*a))
    spec = LayerCacheSpec(80, 2, 64)
    gen = torch.Generator().manual_seed(2)
    for n, inference, taken in ((1, True, True), (decode_attention.MAX_QUERIES, True, True),
                                (decode_attention.MAX_QUERIES + 1, True, False),
                                (1, False, False)):
        calls.clear()
        kv, ref_kv = be.alloc_kv([spec], 1), be.alloc_kv([spec], 1)
        for cache in (kv, ref_kv):
            cache.k[0][:, :, :40] = torch.randn(1, 2, 40, 64, generator=torch.Generator().manual_seed(n))
            cache.v[0][:, :, :40] = torch.randn(1, 2, 40, 64, generator=torch.Generator().manual_seed(n + 9))
        q = torch.randn(1, n, 4, 64, generator=gen, requires_grad=not inference)
        k, v = torch.randn(1, n, 2, 64, generator=gen), torch.randn(1, n, 2, 64, generator=gen)
        view = CacheView(torch.arange(40, 40 + n)[None], None, 40 + n, "causal")
        step = Step(torch.arange(40, 40 + n)[None], n, [view])
        with torch.inference_mode(inference):
            out = be.attention(q, k, v, kv, 0, step, 0.125)
            ref = TorchBackend.attention(be, q, k, v, ref_kv, 0, step, 0.125)
        assert bool(calls) == taken
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
        assert torch.equal(kv.k[0], ref_kv.k[0]) and torch.equal(kv.v[0], ref_kv.v[0])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("window", [0, 8])
def test_which_keys_each_query_sees_comes_from_the_step_arrays(window, n):
    """Steps of n positions ending at every position of a cache, before and after a ring
    wraps: the keys the kernel reads from the step's positions and the ring's slot
    positions are the ones the slot policy's view makes visible (SDPA over its mask)."""
    spec = LayerCacheSpec(window + 4 if window else 40, 2, 64, window=window)
    gen = torch.Generator().manual_seed(window + n)
    kc = _cache(1, 2, spec.slots, 64, torch.float16, gen)
    vc = _cache(1, 2, spec.slots, 64, torch.float16, gen)
    for end in range(n, 30 if window else spec.slots + 1):
        q = torch.randn(1, n, 6, 64, generator=gen)
        n_keys, mask = visible(spec, end - n, end)
        want = _reference(q, kc, vc, n_keys, _allowed(CacheView(None, None, n_keys, mask), n),
                          0.125, 64)
        torch.testing.assert_close(_attend(q, kc, vc, spec, end, 0.125), want, atol=TOL,
                                   rtol=0, msg=lambda m: f"end {end}: {m}")


@pytest.mark.parametrize("window", [0, 8])
def test_a_query_gives_the_same_bits_at_every_step_width(window):
    """Each position of a step of 2 to MAX_QUERIES positions gets the very bits a one-position step
    at that position gets (a speculative verify step then decodes what plain decoding
    does): ends on both sides of a block of CHUNK keys and of a group of four keys, before
    and after a ring wraps."""
    spec = (LayerCacheSpec(window - 1 + 8 + 4, 2, 64, window=window) if window
            else LayerCacheSpec(decode_attention.CHUNK + 24, 2, 64))
    gen = torch.Generator().manual_seed(window)
    kc = _cache(1, 2, spec.slots, 64, torch.float16, gen)
    vc = _cache(1, 2, spec.slots, 64, torch.float16, gen)
    last = spec.slots if not window else 40
    starts = range(1, 30) if window else range(decode_attention.CHUNK - 12, last - 8)
    for n in range(2, decode_attention.MAX_QUERIES + 1):
        for p in starts:
            q = torch.randn(1, n, 6, 64, generator=gen)
            wide = _attend(q, kc, vc, spec, p + n, 0.125)
            for i in range(n):
                one = _attend(q[:, i:i + 1], kc, vc, spec, p + i + 1, 0.125)
                assert torch.equal(wide[:, i], one[:, 0]), (n, p, i)


def test_verify_steps_of_the_default_draft_length_take_the_kernels():
    """A draft of DEFAULT_DRAFT_MAX tokens is verified in a step of one position more; wider
    steps go to SDPA, whose bits differ from one-position steps'."""
    from diptych.inference.speculative import DEFAULT_DRAFT_MAX

    assert decode_attention.MAX_QUERIES >= DEFAULT_DRAFT_MAX + 1
