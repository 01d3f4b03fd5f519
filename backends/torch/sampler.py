"""Next-token sampling with torch, on the logits' device; only the chosen id leaves it.

The filter order is llama.cpp's: penalties, top-k, top-p, min-p, then temperature, then a
draw. top-p and min-p therefore look at the untempered distribution, as in llama.cpp.
"""

from __future__ import annotations

import torch

from diptych.backends.base import NON_FINITE
from diptych.inference.sampling import SamplingParams


def apply_penalties(x: torch.Tensor, params: SamplingParams, history: torch.Tensor) -> torch.Tensor:
    recent = history[-params.penalty_last_n:] if params.penalty_last_n else history[:0]
    if recent.numel() == 0:
        return x
    seen = torch.unique(recent)
    vals = x[seen]
    rep = params.repetition_penalty
    vals = torch.where(vals > 0, vals / rep, vals * rep) - params.presence_penalty
    x = x.clone()
    x[seen] = vals
    return x


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor,
           rng: torch.Generator) -> int:
    x = logits.reshape(-1).to(torch.float32)
    # one host sync, at the end: broken logits draw from zeros, and the id becomes NON_FINITE
    finite = torch.isfinite(x).all()
    x = torch.where(finite, x, torch.zeros_like(x))
    if params.uses_history:
        x = apply_penalties(x, params, history)
    if params.greedy:
        return int(torch.where(finite, torch.argmax(x), NON_FINITE))
    if 0 < params.top_k < x.numel():
        vals, idx = torch.topk(x, params.top_k)
    else:
        vals, idx = torch.sort(x, descending=True)
    probs = torch.softmax(vals, dim=0)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_p < 1.0:
        keep &= (torch.cumsum(probs, 0) - probs) < params.top_p
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs[0]
    vals = torch.where(keep, vals, torch.full_like(vals, -torch.inf))
    probs = torch.softmax(vals / params.temperature, dim=0)
    choice = torch.multinomial(probs, 1, generator=rng)
    return int(torch.where(finite, idx[choice], NON_FINITE))
