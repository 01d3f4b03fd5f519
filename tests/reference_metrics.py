"""Agreement metrics between our logits and the llama.cpp reference fixtures.

The fixtures (``tests/fixtures/reference_*.npz``, made by ``scripts/make_reference_fixtures.py``)
hold, per teacher-forced position, llama.cpp's 32 largest logits with their token ids and the
logsumexp of the full logit row; per greedy step, llama.cpp's token, top1-top2 gap and top-8.

Plain numpy functions; ``ours`` is always our full logit matrix (T, V) (float32, or anything
``np.asarray`` takes, e.g. a CPU torch tensor) for the same token ids as the fixture rows.

Why a margin: llama.cpp rounds activations to 8 bits inside its quantized dot products, so a
correct float implementation differs from it by ~0.1 in logits. Where llama.cpp's own top-1
and top-2 are closer than ``TIE_MARGIN`` (0.75), the argmax may legitimately differ.

KL: ``kl_ref_ours`` is KL(llama.cpp || ours) over 33 buckets, llama.cpp's top-32 tokens plus
"every other token". Lumping the tail into one bucket can only lower a KL (data-processing
inequality), so the value is a lower bound of the full KL; the missing part is exactly
``p_tail * KL(llama tail || our tail)`` (both tails renormalised), small when the two models
agree on the tail's shape. ``scripts/check_reference_fixtures.py`` measures bucketed against
full KL on SmolLM2 (it has llama.cpp's full rows there) to show the gap is negligible.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

TIE_MARGIN = 0.75
FIXTURES = Path(__file__).parent / "fixtures"

# Bounds on the teacher-forced KL(llama.cpp || ours) over the corpus, per model: (mean, 95th
# percentile), for the fp32 paths. Calibration: transformers on the dequantized weights, a
# correct fp32 implementation, measured a mean of 0.0032 / 0.0013 / 0.0048 nats on SmolLM2 /
# Qwen2.5-0.5B / Gemma-3-270M; with this module's bucketed KL it gives 0.0028 on SmolLM2
# (95th percentile 0.0088; scripts/check_reference_fixtures.py). The torch CPU path measures
# 0.0028 / 0.0008 / 0.0044, 95th percentile 0.0088 / 0.0026 / 0.0134. The bounds are 1.5x
# those fp32 means and 1.5x our 95th percentiles. An attention softmax scale off by 5% gives
# 0.0076 (95th percentile 0.0225), 0.0019 (0.0059) and 0.0075 (0.0253): each model fails
# (scripts/mutation_check.py). A path that rounds more (bf16, 8-bit activations) needs its
# own measured bounds.
KL_BOUNDS = {
    "smollm2": (0.0048, 0.013),
    "qwen2": (0.0020, 0.004),
    "gemma3": (0.0072, 0.020),
}

__all__ = [
    "TIE_MARGIN", "KL_BOUNDS", "load_reference", "corpus_segments", "prompt_tokens",
    "log_softmax_rows", "ref_gap_to_tokens", "top1_agreement", "kl_ref_ours", "greedy_check",
    "corpus_agreement",
]


def load_reference(name: str) -> dict[str, Any]:
    """Load ``tests/fixtures/reference_{name}.npz`` ("smollm2", "qwen2") into a dict.

    0-d arrays become Python scalars/strings."""
    with np.load(FIXTURES / f"reference_{name}.npz") as f:
        return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in f.files}


def corpus_segments(fx: Mapping[str, Any]) -> list[slice]:
    """Row slices of the corpus arrays, one per segment (each was evaluated from scratch)."""
    off = fx["corpus_offsets"]
    return [slice(int(a), int(b)) for a, b in zip(off[:-1], off[1:])]


def prompt_tokens(fx: Mapping[str, Any], i: int) -> np.ndarray:
    """The token ids llama.cpp used for greedy prompt ``i``."""
    off = fx["prompt_offsets"]
    return fx["prompt_tokens"][off[i]:off[i + 1]]


def _logsumexp_rows(x: np.ndarray, exclude: np.ndarray | None = None,
                    chunk: int = 256) -> np.ndarray:
    """Each row's logsumexp in float64, `chunk` rows at a time, leaving out the ids of
    `exclude`'s row if given (torch's kernel: numpy's took seconds per thousand rows of a
    152k vocabulary)."""
    out = np.empty(x.shape[0], np.float64)
    for s in range(0, x.shape[0], chunk):
        r = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk])).double()
        if exclude is not None:
            r.scatter_(1, torch.from_numpy(exclude[s:s + chunk].astype(np.int64)), -math.inf)
        out[s:s + chunk] = torch.logsumexp(r, dim=1).numpy()
    return out


def log_softmax_rows(logits: Any) -> np.ndarray:
    """log_softmax of each row, float64 (T, V)."""
    x = np.asarray(logits)
    return x.astype(np.float64) - _logsumexp_rows(x)[:, None]


def ref_gap_to_tokens(ref_top_ids: np.ndarray, ref_top_logits: np.ndarray,
                      tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logit gap between its own top token and ``tokens[t]``, per row.

    Returns (gap (T,) float32, exact (T,) bool). Where the token is not among the stored
    top-k ids, ``gap`` is the lower bound ``top1 - top_k`` and ``exact`` is False."""
    ids = np.asarray(ref_top_ids)
    vals = np.asarray(ref_top_logits, np.float32)
    tokens = np.asarray(tokens).reshape(-1, 1)
    hit = ids == tokens
    exact = hit.any(axis=1)
    col = np.where(exact, hit.argmax(axis=1), ids.shape[1] - 1)
    gap = vals[:, 0] - np.take_along_axis(vals, col[:, None], axis=1)[:, 0]
    return gap.astype(np.float32), exact


def top1_agreement(ours: Any, ref_top_ids: np.ndarray, ref_top_logits: np.ndarray,
                   margin: float = TIE_MARGIN) -> dict[str, Any]:
    """Top-1 agreement of our argmax with llama.cpp's, overall and outside near-ties.

    A position is a near-tie when llama.cpp's own top1 - top2 logit gap is < ``margin``.
    Returned keys: ``n``, ``agree`` (overall rate), ``n_outside_ties``,
    ``agree_outside_ties`` (the number to assert == 1.0; nan when no such position),
    ``mismatches`` (row indices of disagreements outside near-ties),
    ``ref_gap_to_ours`` (T,) llama.cpp's gap between its top token and our argmax (0 where
    we agree; a lower bound where our token is outside llama's top-k: see
    ``ref_gap_to_tokens``), ``ours_argmax`` (T,), ``ref_gap`` (T,) top1 - top2."""
    x = np.asarray(ours)
    ids = np.asarray(ref_top_ids)
    vals = np.asarray(ref_top_logits, np.float32)
    assert x.ndim == 2 and x.shape[0] == ids.shape[0], (x.shape, ids.shape)
    ours_top = x.argmax(axis=1)
    agree = ours_top == ids[:, 0]
    ref_gap = vals[:, 0] - vals[:, 1]
    outside = ref_gap >= margin
    gap_to_ours, _ = ref_gap_to_tokens(ids, vals, ours_top)
    n_out = int(outside.sum())
    return {
        "n": int(x.shape[0]),
        "agree": float(agree.mean()),
        "n_outside_ties": n_out,
        "agree_outside_ties": float(agree[outside].mean()) if n_out else float("nan"),
        "mismatches": np.flatnonzero(outside & ~agree),
        "ref_gap_to_ours": gap_to_ours,
        "ours_argmax": ours_top,
        "ref_gap": ref_gap,
    }


def kl_ref_ours(ours: Any, ref_top_ids: np.ndarray, ref_top_logits: np.ndarray,
                ref_logsumexp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row KL(llama.cpp || ours) in nats over llama's top-k tokens + one tail bucket.

    Returns (kl (T,) float64, ref_tail_mass (T,) float64). A lower bound of the full KL;
    see the module docstring for the size of what the tail bucket hides."""
    x = np.asarray(ours)
    ids = np.asarray(ref_top_ids)
    assert x.ndim == 2 and x.shape[0] == ids.shape[0], (x.shape, ids.shape)
    log_p = np.asarray(ref_top_logits, np.float64) - np.asarray(ref_logsumexp, np.float64)[:, None]
    p = np.exp(log_p)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)

    lse_q = _logsumexp_rows(x)
    log_q = np.take_along_axis(x, ids, axis=1).astype(np.float64) - lse_q[:, None]
    # our tail mass, computed from the tail itself (not 1 - head) for accuracy
    q_tail = np.exp(_logsumexp_rows(x, exclude=ids) - lse_q)

    kl = (p * (log_p - log_q)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * (np.log(p_tail) - np.log(q_tail)), 0.0)
    return kl + tail, p_tail


def greedy_check(ours: Sequence[int], fx: Mapping[str, Any], i: int | None,
                 margin: float = TIE_MARGIN) -> dict[str, Any]:
    """Compare our greedy tokens for prompt ``i`` with llama.cpp's (``i=None``: the long
    sequence's greedy run, ``long_greedy_*``, after its first ``long_prompt`` tokens).

    ``ours``: the tokens we generated (greedy, from ``prompt_tokens(fx, i)``), up to
    ``fx["n_greedy"]`` of them. Only the first ``greedy_n_valid[i]`` steps count (llama.cpp's
    run up to and including its first end-of-generation token). Status:

    - ``"match"``: every compared step agrees;
    - ``"tie"``: the first divergence is at a near-tie: our token is in llama.cpp's top-8
      there and llama.cpp's logit gap between its token and ours is < ``margin`` (the
      sequences legitimately part; nothing after it is compared);
    - ``"short"``: no divergence, but we produced fewer than ``n_valid`` tokens;
    - ``"fail"``: a divergence outside a near-tie.

    Returned keys: ``status``, ``step`` (first divergent step or None), ``ref_gap`` (llama's
    top1-top2 gap there), ``ref_gap_to_ours`` (inf when our token is not in llama's top-8),
    ``compared`` (steps compared), ``ref_tokens``, ``ours``."""
    def ref(key):
        return fx[f"long_{key}"] if i is None else fx[key][i]

    ours = [int(t) for t in ours]
    n_valid = int(ref("greedy_n_valid"))
    want = [int(t) for t in ref("greedy_tokens")[:n_valid]]
    n = min(len(ours), n_valid)
    out: dict[str, Any] = {"status": "match", "step": None, "ref_gap": None,
                           "ref_gap_to_ours": None, "compared": n, "ref_tokens": want,
                           "ours": ours}
    for t in range(n):
        if ours[t] == want[t]:
            continue
        ids = ref("greedy_top_ids")[t]
        vals = ref("greedy_top_logits")[t]
        hit = np.flatnonzero(ids == ours[t])
        gap_to_ours = float(vals[0] - vals[hit[0]]) if hit.size else float("inf")
        out.update(step=t, compared=t + 1, ref_gap=float(ref("greedy_gap")[t]),
                   ref_gap_to_ours=gap_to_ours,
                   status="tie" if gap_to_ours < margin else "fail")
        return out
    if len(ours) < n_valid:
        out["status"] = "short"
    return out


# llama.cpp's greedy reference: argmax with no penalty (the model's own defaults may add one)
PLAIN_GREEDY = dict(temperature=0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0)


def greedy_failures(model, fx: Mapping[str, Any], n_prompts: int | None = None) -> list:
    """Run ``model`` greedily on the fixture's prompts; the (prompt, status, step) of every
    prompt whose tokens part from llama.cpp's other than at a near-tie."""
    n = len(fx["prompt_offsets"]) - 1 if n_prompts is None else n_prompts
    failures = []
    for i in range(n):
        ids = prompt_tokens(fx, i).tolist()
        pieces = model.stream(ids, max_tokens=int(fx["n_greedy"]), **PLAIN_GREEDY)
        ours = [t for p in pieces for t in p.token_ids]
        result = greedy_check(ours, fx, i)
        if result["status"] not in ("match", "tie"):
            failures.append((i, result["status"], result["step"]))
    return failures


def corpus_agreement(model, fx: Mapping[str, Any],
                     n_segments: int | None = None) -> tuple[float, np.ndarray]:
    """``model``'s logits over the fixture's corpus segments (the first ``n_segments``): the
    share of top-1 agreement outside near-ties, and the KL of every position."""
    agree, n_out, kls = 0, 0, []
    for seg in corpus_segments(fx)[:n_segments]:
        ours = model.logits(fx["corpus_tokens"][seg].tolist())
        top = top1_agreement(ours, fx["corpus_topk_ids"][seg], fx["corpus_topk_logits"][seg])
        agree += top["n_outside_ties"] - len(top["mismatches"])
        n_out += top["n_outside_ties"]
        kl, _ = kl_ref_ours(ours, fx["corpus_topk_ids"][seg], fx["corpus_topk_logits"][seg],
                            fx["corpus_logsumexp"][seg])
        kls.append(kl)
    return agree / n_out, np.concatenate(kls)
