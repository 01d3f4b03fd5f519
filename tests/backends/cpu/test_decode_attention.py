"""The CPU decode-attention kernel against torch SDPA in fp32 over the same cache values.

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
from diptych.backends.base import CacheView, LayerCacheSpec
from diptych.backends.torch.backend import TorchBackend
from diptych.backends.torch.cpu import decode_attention
from diptych.inference.slots import slot_positions, visible

TOL = 2e-5


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
    out = decode_attention.attend(q, kc, vc, spec, view, d ** -0.5)
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
    out = decode_attention.attend(q, kc, vc, spec, view, 0.125)
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
    out = decode_attention.attend(q, kc, None, spec, view, 0.1)
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
    out = decode_attention.attend(q, kc, vc, spec, view, 0.125)
    ref = _reference(q, kc, vc, 400, _allowed(view, 1), 0.125, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_the_cpu_backend_takes_decode_widths_and_leaves_the_rest_to_sdpa(monkeypatch):
    """CpuBackend.attend_cache: steps of up to MAX_QUERIES positions outside autograd over
    at least MIN_KEYS slots go to the kernel; wider steps, shorter caches and steps autograd
    records go to TorchBackend's SDPA."""
    be = select("torch", "cpu")
    calls, kernel = [], decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *a: calls.append(1) or kernel(*a))
    long = decode_attention.MIN_KEYS
    spec = LayerCacheSpec(64, 2, long + 64)
    kc = torch.randn(1, 2, long + 64, 64)
    for n, keys, grad, taken in ((1, long, False, True),
                                 (decode_attention.MAX_QUERIES, long + 32, False, True),
                                 (decode_attention.MAX_QUERIES + 1, long, False, False),
                                 (1, long - 1, False, False), (1, long, True, False)):
        calls.clear()
        q = torch.randn(1, n, 4, 64, requires_grad=grad)
        view = CacheView(None, None, keys, None if n == 1 else "causal")
        out = be.attend_cache(q, kc, kc, spec, view, 0.125)
        assert bool(calls) == taken
        ref = TorchBackend.attend_cache(be, q, kc, kc, spec, view, 0.125)
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
