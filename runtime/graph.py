"""The one model graph: a decoder-only transformer written against the backend contract.

It imports no torch, mlx or triton; every array operation goes through `backend` (plus `+`,
`*` and `.reshape`, which all backend array types share).
"""

from __future__ import annotations

import numpy as np

from diptych.backends.base import Backend, KVStorage, RopeSpec, Step

from .config import ModelConfig
from .weights import ModelWeights


def forward(backend: Backend, cfg: ModelConfig, w: ModelWeights, tokens, kv: KVStorage,
            step: Step, logits_at: np.ndarray | None = None):
    """Run `tokens` (B, T) through the model, writing their K/V into `kv` at `step`.

    `logits_at` picks the positions (indices into T) whose logits are computed; None means
    only the last one. Returns (B, len(logits_at), vocab) logits as a backend array.
    """
    be = backend
    batch, n_tok = step.positions.shape
    rope = RopeSpec(cfg.rope_dim, cfg.rope_theta)
    scale = cfg.head_dim ** -0.5

    x = be.embed(w.tok_embd, tokens)
    for i, layer in enumerate(w.layers):
        h = be.rms_norm(x, layer.attn_norm, cfg.rms_eps)
        q = be.linear(h, layer.wq, layer.bq).reshape(batch, n_tok, cfg.n_heads, cfg.head_dim)
        k = be.linear(h, layer.wk, layer.bk).reshape(batch, n_tok, cfg.n_kv_heads, cfg.head_dim)
        v = be.linear(h, layer.wv, layer.bv).reshape(batch, n_tok, cfg.n_kv_heads, cfg.head_dim)
        q = be.rope(q, step.positions, rope)
        k = be.rope(k, step.positions, rope)
        x = x + be.linear(be.attention(q, k, v, kv, i, step, scale), layer.wo)

        h = be.rms_norm(x, layer.ffn_norm, cfg.rms_eps)
        x = x + be.linear(be.swiglu(be.linear(h, layer.w_gate), be.linear(h, layer.w_up)),
                          layer.w_down)

    if logits_at is None:
        logits_at = np.array([n_tok - 1])
    x = be.take_positions(x, logits_at)
    return be.linear(be.rms_norm(x, w.output_norm, cfg.rms_eps), w.output)
