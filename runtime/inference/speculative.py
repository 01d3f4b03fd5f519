"""Speculative decoding: a drafter proposes tokens, the target checks them all in one pass.

Each pass: the drafter proposes up to k tokens x_0..x_{k-1} (a draft model sampling with the
user's parameters, or prompt lookup copying what followed the last n-gram earlier in the
context); the target runs one step of width k + 1 over [last token, x_0..x_{k-1}], which
gives its filtered distribution p_j after each prefix; `verify_block` keeps the longest
accepted prefix and adds one token of the target's (the residual draw at the first
rejection, or the bonus token when all k are accepted). Both caches then roll back what
was not emitted.

Lossless: greedy, every emitted token is the target's argmax after the same prefix. At
temperature > 0, rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept x_j
with probability min(1, p_j(x_j) / q_j(x_j)), else draw from normalise(max(0, p_j - q_j));
p and q are the *filtered* distributions the sampler draws from (penalties over the history
including the earlier drafts, top-k, top-p, min-p, temperature), so the emitted tokens
follow the target's own sampling distribution. Prompt lookup's q is one-hot.

Draft length: the draft model stops where its most likely token's probability falls below
`P_MIN` (llama.cpp's p_min; read from the distribution, never from the token drawn, which
would skew the drafts verified), and `DraftLength` picks k for each pass from the acceptance
counts so far and the costs of a draft step and of a wider verify step relative to a plain
target step, measured once per model pair (`measure_costs`): with a seed, the lengths then
depend only on the tokens, and so does the output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from diptych.errors import InvalidArgumentError

from .generate import Emitter, Piece, Timings, check_finite, check_request
from .sampler import Sampler
from .sampling import SamplingParams

DEFAULT_DRAFT_MAX = 8     # most tokens drafted per pass (the caches roll back this far)
DEFAULT_LOOKUP_NGRAM = 3  # prompt lookup matches the last 3 tokens, then 2, then 1
P_MIN = 0.75              # a draft model stops drafting below this top probability
PROBE_EVERY = 16          # while drafting does not pay, still draft one token this often
DECAY = 0.9               # weight of older passes in the acceptance estimate
COST_STEP = 0.05          # measured cost ratios are rounded to this, for reproducibility


def _seed(seed: int | None, stream: int) -> int | None:
    """An independent seed for one of a generation's random streams (None: from the OS)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# -- the acceptance rule --------------------------------------------------------------------
def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Where a rejected draft's replacement is drawn from (unnormalised): max(0, p - q)."""
    return np.maximum(p - q, 0.0)


def draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of non-negative `weights` (R, V), by inverse CDF."""
    cdf = np.cumsum(weights, axis=-1, dtype=np.float64)
    u = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(-1), weights.shape[-1] - 1)


def accept_or_resample(p: np.ndarray, q: np.ndarray, x: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of target p and draft q (R, V) and the drafted tokens x (R,), drawn from q:
    whether each is accepted (probability min(1, p(x) / q(x))), and the token that replaces
    it if not (a draw from the residual)."""
    rows = np.arange(len(x))
    accepted = rng.random(len(x)) * q[rows, x] < p[rows, x]
    res = residual(p, q)
    # p == q leaves no residual and never rejects; only rounding can get here then
    res = np.where(res.sum(-1, keepdims=True) > 0, res, p)
    return accepted, draw(res, rng)


def verify_block(p: np.ndarray, q: np.ndarray, x: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of target rows p (N, k + 1, V), draft rows q (N, k, V) and drafts x (N, k):
    per block the number n of drafts accepted (a prefix) and the target's token after them
    (the replacement of draft n, or with all k accepted a bonus token drawn from p[:, k])."""
    n_blocks, k = x.shape
    vocab = p.shape[-1]
    accepted, replacement = accept_or_resample(
        p[:, :k].reshape(-1, vocab), q.reshape(-1, vocab), x.reshape(-1), rng)
    accepted, replacement = accepted.reshape(n_blocks, k), replacement.reshape(n_blocks, k)
    n = np.cumprod(accepted, axis=1).sum(1)   # the accepted prefix
    bonus = draw(p[:, k], rng)
    if not k:
        return n, bonus
    return n, np.where(n < k, replacement[np.arange(n_blocks), np.minimum(n, k - 1)], bonus)


def greedy_block(target_tokens: list[int], drafts: list[int]) -> tuple[int, int]:
    """Greedy verification: drafts are accepted while they are the target's argmax."""
    n = 0
    while n < len(drafts) and drafts[n] == target_tokens[n]:
        n += 1
    return n, target_tokens[n]


def row_histories(history, drafts: list[int]) -> list[list[int]]:
    """The penalty history of each verified row: row j counts drafts 0..j-1, as plain decoding
    would have once they were emitted."""
    window = list(history.windows[0])
    return [window + drafts[:j] for j in range(len(drafts) + 1)]


def emitted_tokens(drafts: list[int], n: int, token: int) -> list[int]:
    """A pass emits its accepted drafts and then the target's token."""
    return list(drafts[:n]) + [token]


def one_hot(tokens: list[int], vocab: int) -> np.ndarray:
    q = np.zeros((len(tokens), vocab), np.float32)
    q[np.arange(len(tokens)), tokens] = 1.0
    return q


# -- draft length ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """A pass's costs in units of one plain target step: `draft` per drafted token (0 for
    prompt lookup), `verify` per extra token of verify width."""

    draft: float
    verify: float


class DraftLength:
    """Chooses each pass's draft length k to maximise expected tokens per unit of cost.

    With per-token acceptance a, a pass drafting k tokens emits (1 - a^(k+1)) / (1 - a)
    tokens on average and costs 1 + k (draft + verify). a is estimated from the acceptance
    counts (older passes weigh less). When no k > 0 pays, one token is still drafted every
    PROBE_EVERY passes so that a change is noticed.
    """

    def __init__(self, draft_max: int, costs: Costs):
        self.draft_max, self.costs = draft_max, costs
        self.accepted, self.rejected = 1.0, 1.0   # prior: a = 0.5
        self.idle = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def choose(self, limit: int) -> int:
        a, c = self.acceptance, self.costs.draft + self.costs.verify
        top = min(limit, self.draft_max)
        best = max(range(top + 1),
                   key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + k * c) if a < 1 else k)
        if best == 0 and top > 0:
            self.idle += 1
            if self.idle >= PROBE_EVERY:
                self.idle = 0
                return 1
        return best

    def record(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted = DECAY * self.accepted + accepted
            self.rejected = DECAY * self.rejected + (accepted < drafted)


def _timed(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _step_time(seq, token: int, width: int) -> float:
    """Seconds of a step of `width` on `seq`, which is left as it was."""
    be = seq.engine.backend

    def run():
        be.to_numpy(seq.step([token] * width)[0, -1, :1])
        seq.rollback(width)

    run()  # the first call of a width may compile
    return _timed(run)


def measure_costs(target, draft, width: int, token: int) -> Costs:
    """The costs of `DraftLength` for a target Sequence and a draft Sequence (None: prompt
    lookup), each step rolled back: a width-1 target step, a width-`width` one and a draft
    step, rounded to COST_STEP."""
    def rounded(x: float) -> float:
        return round(max(x, 0.0) / COST_STEP) * COST_STEP

    one = _step_time(target, token, 1)
    wide = _step_time(target, token, width) if width > 1 else one
    drafted = _step_time(draft, token, 1) if draft is not None else 0.0
    return Costs(rounded(drafted / one), rounded((wide - one) / one / max(width - 1, 1)))


# -- drafters -------------------------------------------------------------------------------
class ModelDraft:
    """A draft model's Sequence, drafting with the user's sampling parameters."""

    def __init__(self, seq, params: SamplingParams, target_vocab: int):
        self.seq, self.params, self.target_vocab = seq, params, target_vocab
        # its own random stream: drafts drawn with the target's uniforms would be correlated
        # with the target's tokens
        be, vocab = seq.engine.backend, seq.engine.cfg.vocab_size
        self.sampler = Sampler(be, replace(params, seed=_seed(params.seed, 1)), vocab)
        # a draft vocabulary padded past the target's drafts only ids the target has
        self.mask = None
        if vocab > target_vocab:
            self.mask = be.prepare_vector((np.arange(vocab) < target_vocab).astype(
                np.float32)).reshape(1, vocab) > 0

    def _sync(self, ctx: list[int]):
        """The draft cache holding ctx; the logits after it (None for an empty ctx)."""
        seq = self.seq
        keep = min(seq.cache.common_prefix(ctx), len(ctx) - 1)
        if seq.n_cached - keep <= seq.cache.max_rollback:
            seq.rollback(seq.n_cached - keep)
            return seq.eval(ctx[keep:]) if ctx[keep:] else None
        return seq.prefill(ctx)

    def propose(self, ctx: list[int], k: int) -> tuple[list[int], np.ndarray | None]:
        """Up to k drafted tokens after ctx, and the (len, target vocab) q they were drawn
        from (None when greedy)."""
        be, greedy = self.seq.engine.backend, self.params.greedy
        drafts, q = [], []
        with self.seq.lock:
            logits = self._sync(ctx)
            history = self.sampler.history([ctx])
            for i in range(k):
                drawn = self.sampler.sample(logits, history, mask=self.mask,
                                            probs=not greedy, logprobs=1)
                token = drawn.tokens[0]
                # the cut-off reads the distribution, never the token drawn from it: stopping
                # on the token would skew which drafts reach verification
                if not drawn.finite[0] or math.exp(drawn.top_logprobs[0, 0]) < P_MIN:
                    break
                drafts.append(token)
                if not greedy:
                    q.append(self._target_width(be.to_numpy(drawn.probs)[0]))
                if i + 1 < k:
                    if history is not None:
                        history.append([token])
                    logits = self.seq.eval([token])
        return drafts, (np.stack(q) if q else None)

    def _target_width(self, row: np.ndarray) -> np.ndarray:
        """A draft distribution over the target's ids (the vocabularies differ in padding)."""
        out = np.zeros(self.target_vocab, np.float32)
        n = min(len(row), self.target_vocab)
        out[:n] = row[:n]
        return out

    def settle(self, ctx: list[int]) -> None:
        """Make the draft cache hold ctx[:-1], as the target's does when generation ends."""
        with self.seq.lock:
            self._sync(ctx[:-1])


class LookupDraft:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's
    last n-gram (n from `ngram` down to 1). A deterministic draft: q is one-hot."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, ctx: list[int], k: int) -> tuple[list[int], None]:
        ids = np.asarray(ctx)
        for n in range(min(self.ngram, len(ids) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(1))
            if len(hits):
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist(), None
        return [], None

    def settle(self, ctx: list[int]) -> None:
        pass


def check_draft_max(draft_max, *sequences) -> int:
    if not isinstance(draft_max, int) or isinstance(draft_max, bool) or draft_max < 1:
        raise InvalidArgumentError(f"draft_max must be a positive integer, got {draft_max!r}")
    room = min(s.cache.max_rollback for s in sequences)
    if draft_max > room:
        raise InvalidArgumentError(
            f"draft_max {draft_max} exceeds the {room} tokens the caches can roll back; load "
            f"the model with draft_max={draft_max} or more")
    return draft_max


# -- the decode loop ------------------------------------------------------------------------
def _verify(sampler: Sampler, logits, history, drafts: list[int], q, rng):
    """The target's rows for one pass -> (drafts accepted, the target's token, finite flags
    of the rows used)."""
    k, vocab = len(drafts), sampler.vocab_size
    rows = None if history is None else sampler.history(row_histories(history, drafts))
    drawn = sampler.sample(logits, rows, probs=not sampler.params.greedy)
    if sampler.params.greedy:
        n, token = greedy_block(drawn.tokens, drafts)
    else:
        p = sampler.backend.to_numpy(drawn.probs)
        q = one_hot(drafts, vocab) if q is None else q
        n, token = verify_block(p[None], q[None], np.asarray([drafts], np.int64).reshape(1, k),
                                rng)
        n, token = int(n[0]), int(token[0])
    return n, token, drawn.finite[:n + 1]


def stream_speculative(engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                       params: SamplingParams, stop: list[str] | None, drafter,
                       length: DraftLength) -> Iterator[Piece]:
    """`stream_tokens` with speculative passes on the engine's first sequence."""
    budget = check_request(engine, prompt_ids, max_tokens)
    seq = engine.main
    timings = Timings(prompt_tokens=len(prompt_ids))
    sampler = Sampler(engine.backend, params, engine.cfg.vocab_size)
    out = Emitter(tokenizer, stop, budget, sampler.history([prompt_ids]), timings)
    # the acceptance and residual draws; the sampler's generator draws the rest
    rng = np.random.default_rng(_seed(params.seed, 2))

    t0 = time.perf_counter()
    logits = seq.prefill(prompt_ids)
    timings.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    drawn = sampler.sample(logits, out.history)
    check_finite(drawn.finite, len(prompt_ids))
    ctx = list(prompt_ids)
    pieces = [out.emit(drawn.tokens[0])]
    ctx.append(drawn.tokens[0])
    while True:
        yield from pieces
        if pieces[-1].finish_reason:
            drafter.settle(ctx)
            return
        left = budget - timings.generated_tokens
        k = length.choose(min(left - 1, engine.capacity - len(ctx)))
        drafts, q = drafter.propose(ctx, k) if k else ([], None)
        logits = seq.step([ctx[-1]] + drafts)[0]
        n, token, finite = _verify(sampler, logits, out.history, drafts, q, rng)
        check_finite(finite, len(ctx))
        timings.drafted += len(drafts)
        timings.accepted += n
        timings.verify_passes += 1
        length.record(len(drafts), n)
        pieces = []
        for t in emitted_tokens(drafts, n, token):
            pieces.append(out.emit(t))
            ctx.append(t)
            if pieces[-1].finish_reason:
                break
        # the target now holds the old ctx[:-1] and the k + 1 tokens fed: keep the new ctx[:-1]
        seq.rollback(seq.n_cached - (len(ctx) - 1))
        timings.decode_s = time.perf_counter() - t0
