"""Decode attention kernels (full, sliding window, ring buffer, explicit slots, MLA) against
a float64 softmax over the keys each query may see."""

import numpy as np
import pytest
import torch

from diptych.backends.base import LayerCacheSpec
from diptych.backends.torch.cuda.backend import CudaBackend
from diptych.backends.torch.cuda.kernels import attention as at
from diptych.inference.slots import SlotPolicy

from .conftest import DTYPES


def _ref(q, keys, values, key_pos, q_pos, scale, window=0):
    """q (B, T, H, D); keys/values (B, S, Hkv, D) with key_pos (B, S) (-1 empty)."""
    q, keys, values = (a.double().cpu() for a in (q, keys, values))
    key_pos, q_pos = key_pos.cpu(), q_pos.cpu()
    batch, n_tok, n_heads, _ = q.shape
    group = n_heads // keys.shape[2]
    out = torch.zeros(q.shape[:3] + (values.shape[-1],), dtype=torch.float64)
    for b in range(batch):
        for t in range(n_tok):
            p = q_pos[b, t]
            ok = (key_pos[b] >= 0) & (key_pos[b] <= p)
            if window:
                ok &= key_pos[b] > p - window
            for h in range(n_heads):
                s = keys[b, ok, h // group] @ q[b, t, h] * scale
                out[b, t, h] = torch.softmax(s, 0) @ values[b, ok, h // group]
    return out


def _close(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(got.double().cpu().numpy(), want.numpy(), rtol=tol, atol=tol)


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tok,window", [(1, 0), (3, 0), (1, 10), (3, 10)])
def test_full_cache_gqa(dtype, n_tok, window, device):
    batch, n_heads, hkv, dim, cap = 2, 4, 2, 24, 100  # head dim 24: a masked tail
    q = _rand(batch, n_tok, n_heads, dim, dtype=dtype, device=device)
    kc = _rand(batch, hkv, cap, dim, dtype=dtype, device=device, seed=1)
    vc = _rand(batch, hkv, cap, dim, dtype=dtype, device=device, seed=2)
    last = torch.tensor([36, 99])
    q_pos = (last[:, None] - torch.arange(n_tok - 1, -1, -1)[None, :]).to(device)
    slots = torch.arange(cap).expand(batch, cap)
    want = _ref(q, kc.transpose(1, 2), vc.transpose(1, 2), slots, q_pos, 0.2, window)
    for n_split in (None, 3):  # 3 splits of 16-key blocks: empty and partial splits
        got = at.decode_attention(q, kc, vc, q_pos, 0.2, window=window, n_split=n_split,
                                  block_s=16)
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ring_buffer_window(dtype, device):
    # window 8, 2 tokens per step: 8 - 1 + 2 = 9 slots; write 25 positions through the ring,
    # in the slots the runtime's slot policy gives
    batch, n_heads, hkv, dim, window, n_tok = 1, 4, 1, 16, 8, 2
    policy = SlotPolicy([LayerCacheSpec(window - 1 + n_tok, hkv, dim, window=window)])
    kc = torch.zeros(batch, hkv, policy.specs[0].slots, dim, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    all_k = _rand(batch, 26, hkv, dim, dtype=dtype, device=device, seed=3)
    all_v = _rand(batch, 26, hkv, dim, dtype=dtype, device=device, seed=4)
    be = CudaBackend(device, dtype)
    for start in range(0, 26, n_tok):
        pos = torch.arange(start, start + n_tok, device=device)[None, :]
        slots, key_pos = policy.arrays(be, start, n_tok)
        at.write_kv(all_k[:, start:start + n_tok], all_v[:, start:start + n_tok], kc, vc, slots)
        q = _rand(batch, n_tok, n_heads, dim, dtype=dtype, device=device, seed=start)
        got = at.decode_attention(q, kc, vc, pos, 0.25, window=window, slot_pos=key_pos,
                                  block_s=16)
        hist = torch.arange(start + n_tok)
        want = _ref(q, all_k[:, :start + n_tok], all_v[:, :start + n_tok], hist[None], pos,
                    0.25, window)
        _close(got, want, dtype)


def test_explicit_slot_positions(device):
    batch, n_heads, hkv, dim, cap = 2, 2, 2, 16, 20
    q = _rand(batch, 1, n_heads, dim, dtype=torch.float32, device=device)
    kc = _rand(batch, hkv, cap, dim, dtype=torch.float32, device=device, seed=5)
    vc = _rand(batch, hkv, cap, dim, dtype=torch.float32, device=device, seed=6)
    g = torch.Generator().manual_seed(0)
    slot_pos = torch.stack([torch.randperm(cap, generator=g) for _ in range(batch)])
    slot_pos[:, :3] = -1  # empty slots
    q_pos = torch.tensor([[15], [19]])
    got = at.decode_attention(q, kc, vc, q_pos.to(device), 0.3, window=6,
                              slot_pos=slot_pos.to(device, torch.int32),
                              block_s=16)
    want = _ref(q, kc.transpose(1, 2), vc.transpose(1, 2), slot_pos, q_pos, 0.3, 6)
    _close(got, want, torch.float32)


def test_write_kv_full(device):
    kc = torch.zeros(2, 3, 10, 8, device=device)
    vc = torch.zeros_like(kc)
    k = _rand(2, 2, 3, 8, dtype=torch.float32, device=device)
    v = _rand(2, 2, 3, 8, dtype=torch.float32, device=device, seed=1)
    pos = torch.tensor([[4, 5], [8, 9]], device=device)
    at.write_kv(k, v, kc, vc, pos)
    for b in range(2):
        for t in range(2):
            assert torch.equal(kc[b, :, pos[b, t]], k[b, t])
            assert torch.equal(vc[b, :, pos[b, t]], v[b, t])
    assert kc.abs().sum(dim=-1).count_nonzero() == 12  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mla_latent_attention(dtype, device):
    # 5 heads in blocks of 4 (a partial head block); latent 40 and rope 8 are padded to 64/16
    batch, n_tok, n_heads, rank, rope_dim, cap = 2, 2, 5, 40, 8, 50
    ql = _rand(batch, n_tok, n_heads, rank, dtype=dtype, device=device)
    qr = _rand(batch, n_tok, n_heads, rope_dim, dtype=dtype, device=device, seed=1)
    c = _rand(batch, cap, rank, dtype=dtype, device=device, seed=2)
    kr = _rand(batch, cap, rope_dim, dtype=dtype, device=device, seed=3)
    q_pos = torch.tensor([[20, 21], [47, 48]], device=device)
    got = at.mla_decode_attention(ql, qr, c, kr, q_pos, 0.1, n_split=3, heads_per_program=4,
                                  block_s=16)
    # the same attention as one KV head whose key is [c | k_rope] and whose value is c
    q = torch.cat([ql, qr], -1)
    keys = torch.cat([c, kr], -1)[:, :, None]
    want = _ref(q, keys, c[:, :, None], torch.arange(cap)[None].expand(batch, cap), q_pos, 0.1)
    _close(got, want, dtype)
