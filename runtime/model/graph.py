"""The one model graph: a decoder-only transformer written against the backend contract.

It imports no torch, mlx or triton; every array operation goes through `backend` (plus `+`,
`*`, slicing and `.reshape`, which all backend array types share). Family differences are
the ModelConfig switches read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from diptych.backends.base import Backend, KVStorage, RopeSpec, Step, StepKeys
from diptych.inference.cache import layer_specs
from diptych.inference.slots import SlotPolicy

from .adapters import pair_arrays, with_pair_arrays
from .config import ModelConfig
from .moe import moe_ffn
from .weights import LayerWeights, ModelWeights


def forward(backend: Backend, cfg: ModelConfig, w: ModelWeights, tokens,
            kv: KVStorage | RowCaches, step: Step, logits_at: np.ndarray | None = None,
            recompute: bool = False, hidden_only: bool = False):
    """Run `tokens` (B, T) through the model, writing their K/V into `kv` at `step` (or, for
    `forward_rows`, into each row's own cache).

    `logits_at` picks the positions (indices into T) whose logits are computed; None means
    only the last one. Returns (B, len(logits_at), vocab) logits as a backend array.
    `recompute`: each layer through `backend.checkpoint` (training keeps only the layers'
    inputs and recomputes the rest in the backward pass). `hidden_only`: return the final
    normed hidden states (B, T, D) instead, for `head` to take in pieces.
    """
    be = backend
    x = be.embed(w.tok_embd, tokens, cfg.embed_scale)
    # each residual add is fused with the norm that follows it (the next layer's, or the
    # output norm after the last layer)
    next_norms = [layer.attn_norm for layer in w.layers[1:]] + [w.output_norm]
    if recompute:  # a checkpointed layer keeps only x (B, T, D): h = norm(x) comes back with it
        for i, layer in enumerate(w.layers):
            # its adapters' arrays go in as arguments: what the gradient must reach
            x = be.checkpoint(partial(_block_from_residual, be, cfg, layer, kv, i, step,
                                      w.ropes[i], next_norms[i]))(x, *pair_arrays(layer))
        h = be.rms_norm(x, w.output_norm, cfg.rms_eps)
    else:
        h = be.rms_norm(x, w.layers[0].attn_norm, cfg.rms_eps)
        for i, layer in enumerate(w.layers):
            x, h = _block(be, cfg, layer, kv, i, step, w.ropes[i], next_norms[i], x, h)

    if hidden_only:
        return h
    if logits_at is None:
        logits_at = np.array([step.n_tokens - 1])
    return head(be, cfg, w, be.take_positions(h, logits_at))


def head(backend: Backend, cfg: ModelConfig, w: ModelWeights, h):
    """Logits of final hidden states h (B, T, D) (normed, as `forward` leaves them)."""
    logits = backend.linear(h, w.output)
    if cfg.final_softcap:
        logits = backend.softcap(logits, cfg.final_softcap)
    return logits


@dataclass
class RowCaches:
    """Several sequences' decode steps run as one forward: row b of the tokens (B, 1) is the
    next token of the sequence whose cache is `storages[b]`, at `steps[b]`. Everything but
    attention runs over the B rows together (each weight read once for all of them);
    attention runs row by row over each row's own cache."""

    storages: list[KVStorage]
    steps: list[Step]


def forward_rows(backend: Backend, cfg: ModelConfig, w: ModelWeights, tokens, positions,
                 rows: RowCaches):
    """One decode step of B sequences: tokens and positions (B, 1) -> logits (B, 1, vocab)."""
    return forward(backend, cfg, w, tokens, rows, Step(positions, 1, []))


def _attend(be, q, k, v, kv, i: int, step: Step, scale: float):
    """be.attention over one cache, or row by row over RowCaches (decode: T = 1)."""
    if not isinstance(kv, RowCaches):
        return be.attention(q, k, v, kv, i, step, scale)
    outs = [be.attention(q[b:b + 1], k[b:b + 1], None if v is None else v[b:b + 1], storage, i,
                         row_step, scale)
            for b, (storage, row_step) in enumerate(zip(kv.storages, kv.steps))]
    # (1, 1, D) rows side by side on the last axis are the (B, 1, D) rows in memory order
    return be.concat(outs).reshape(len(outs), 1, -1)


def forward_all(backend: Backend, cfg: ModelConfig, w: ModelWeights, tokens,
                logits_at: np.ndarray | None = None, recompute: bool = False,
                hidden_only: bool = False):
    """Logits (B, T, vocab) at every position of `tokens` (B, T) from an empty context (or
    at the positions `logits_at` picks): the forward pass training uses (outside
    `backend.inference()`, autograd records it). Each layer attends over the step's own keys
    (`StepKeys`): no cache is written. `recompute`, `hidden_only`: see `forward`."""
    batch, n = tokens.shape
    specs = layer_specs(cfg, n, n)
    kv = StepKeys(specs)
    positions = backend.ids(np.broadcast_to(np.arange(n), (batch, n)))
    slots = SlotPolicy(specs)
    step = Step(positions, n, slots.views(slots.arrays(backend, 0, n, batch), 0, n))
    return forward(backend, cfg, w, tokens, kv, step,
                   np.arange(n) if logits_at is None else logits_at, recompute, hidden_only)


def _block(be, cfg: ModelConfig, layer: LayerWeights, kv, i: int, step: Step, rope: RopeSpec,
           next_norm, x, h):
    """One layer: the residual stream x and its normed h in, the next x and h out."""
    eps = cfg.rms_eps
    a = (_mla if cfg.mla else _attention)(be, cfg, layer, h, kv, i, step, rope)
    if layer.post_attn_norm is not None:
        a = be.rms_norm(a, layer.post_attn_norm, eps)
    x, h = be.add_rms_norm(a, x, layer.ffn_norm, eps)
    f = _ffn(be, cfg, layer, h)
    if layer.post_ffn_norm is not None:
        f = be.rms_norm(f, layer.post_ffn_norm, eps)
    return be.add_rms_norm(f, x, next_norm, eps)


def _block_from_residual(be, cfg: ModelConfig, layer: LayerWeights, kv, i: int, step: Step,
                         rope: RopeSpec, next_norm, x, *pairs):
    """`_block` from the residual stream alone (its normed h recomputed), the layer's
    adapters holding `pairs` (`pair_arrays` order): the next x."""
    layer = with_pair_arrays(layer, pairs)
    h = be.rms_norm(x, layer.attn_norm, cfg.rms_eps)
    return _block(be, cfg, layer, kv, i, step, rope, next_norm, x, h)[0]


def _linear(be, layer: LayerWeights, name: str, x, bias=None):
    """be.linear on one of the layer's matrices, with the adapter pairs it carries."""
    return be.linear(x, getattr(layer, name), bias, layer.adapters.get(name))


def _attention(be, cfg: ModelConfig, layer: LayerWeights, h, kv, i: int, step: Step,
               rope: RopeSpec):
    batch, n_tok = step.positions.shape
    if layer.wqkv is not None:
        qkv = _linear(be, layer, "wqkv", h, layer.bqkv)
        q_end, k_end = cfg.q_dim, cfg.q_dim + cfg.kv_dim
        q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
    else:
        q, k, v = (_linear(be, layer, "wq", h, layer.bq), _linear(be, layer, "wk", h, layer.bk),
                   _linear(be, layer, "wv", h, layer.bv))
    q = q.reshape(batch, n_tok, cfg.n_heads, cfg.head_dim)
    k = k.reshape(batch, n_tok, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(batch, n_tok, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = be.rms_norm(q, layer.q_norm, cfg.rms_eps)
        k = be.rms_norm(k, layer.k_norm, cfg.rms_eps)
    q = be.rope(q, step.positions, rope)
    k = be.rope(k, step.positions, rope)
    return _linear(be, layer, "wo", _attend(be, q, k, v, kv, i, step, cfg.softmax_scale()))


def _mla(be, cfg: ModelConfig, layer: LayerWeights, h, kv, i: int, step: Step, rope: RopeSpec):
    """Multi-head latent attention with weight absorption: the cache holds one latent
    (normalised c_kv) and one RoPE'd key part per token; queries are mapped into the latent
    space by W_UK, attention runs there, and W_UV maps its output to values."""
    m = cfg.mla
    batch, n_tok = step.positions.shape
    if layer.wq_a is not None:
        q = _linear(be, layer, "wq_b",
                    be.rms_norm(_linear(be, layer, "wq_a", h), layer.q_a_norm, cfg.rms_eps))
    else:
        q = _linear(be, layer, "wq", h)
    q = q.reshape(batch, n_tok, cfg.n_heads, m.qk_nope + m.qk_rope)
    q_lat = be.head_linear(q[..., :m.qk_nope], layer.k_b)           # (B, T, H, kv_lora)
    q_pe = be.rope(q[..., m.qk_nope:], step.positions, rope)
    kv_a = _linear(be, layer, "wkv_a", h).reshape(batch, n_tok, 1, m.kv_lora_rank + m.qk_rope)
    c_kv = be.rms_norm(kv_a[..., :m.kv_lora_rank], layer.kv_a_norm, cfg.rms_eps)
    k_pe = be.rope(kv_a[..., m.kv_lora_rank:], step.positions, rope)
    out = _attend(be, be.concat([q_lat, q_pe]), be.concat([c_kv, k_pe]), None, kv, i, step,
                  cfg.softmax_scale())                                   # (B, T, H*kv_lora)
    out = be.head_linear(out.reshape(batch, n_tok, cfg.n_heads, m.kv_lora_rank), layer.v_b)
    return _linear(be, layer, "wo", out.reshape(batch, n_tok, cfg.n_heads * m.v_head_dim))


def _ffn(be, cfg: ModelConfig, layer: LayerWeights, h):
    """The dense FFN (in MoE layers: the shared experts, if any) plus the routed experts."""
    out = None
    if layer.w_gate_up is not None:
        out = _linear(be, layer, "w_down", be.glu_halves(_linear(be, layer, "w_gate_up", h),
                                                         cfg.act))
    elif layer.w_gate is not None:
        out = _linear(be, layer, "w_down", be.glu(_linear(be, layer, "w_gate", h),
                                                  _linear(be, layer, "w_up", h), cfg.act))
    if layer.experts is not None:
        routed = moe_ffn(be, cfg.moe, layer.experts, h, cfg.act)
        out = routed if out is None else out + routed
    return out
