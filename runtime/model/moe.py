"""Mixture-of-experts FFN: routing written once over small backend ops, on the device.

Which experts each token uses, and with what weight, is computed here from the router's
logits (softmax or sigmoid scores, a selection-only bias, group-limited choice,
renormalisation, the routed scale); the backend's `expert_ffn` then runs the chosen experts
over their tokens (ggml's mul_mat_id). Nothing reads a routing value on the host, so a
backend can capture or compile the decode step whole.
"""

from __future__ import annotations

from .config import MoESpec


def route(be, logits, spec: MoESpec, score_bias=None):
    """(tokens, n_experts) router logits -> (weights in float32, expert ids), both
    (tokens, n_used).

    Group-limited routing (DeepSeek) ranks each group by its best score, or by the sum of its
    best two with sigmoid scores (V3), and keeps the n_groups_used best groups: those whose
    rank reaches the n_groups_used-th best (a tie there keeps both groups)."""
    scores = be.softmax(logits) if spec.gating == "softmax" else be.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias
    if spec.n_groups > 1:
        n = choice.shape[0]
        grouped = choice.reshape(n, spec.n_groups, -1)
        rank = be.topk(grouped, 2 if spec.gating == "sigmoid" else 1)[0].sum(-1)
        keep = rank >= be.topk(rank, spec.n_groups_used)[0][:, -1:]
        # experts of the dropped groups score 0, as in the reference implementations
        choice = (grouped * keep[..., None]).reshape(n, -1)
    chosen = be.topk(choice, spec.n_used)[1]
    weights = be.gather(scores, chosen)
    if spec.norm_topk:
        weights = weights / (weights.sum(-1)[..., None] + 1e-20)
    return weights * spec.scale, chosen


def moe_ffn(be, spec: MoESpec, experts, h, act: str):
    """The routed experts' output for h (B, T, D): each token through its chosen experts,
    combined with its routing weights."""
    flat = h.reshape(-1, h.shape[-1])
    weights, chosen = route(be, be.linear(flat, experts.router), spec, experts.score_bias)
    return be.expert_ffn(flat, experts, chosen, weights, act).reshape(h.shape)
