"""Speculative decoding: a drafter proposes tokens, the target checks them all in one pass.

Each pass: the drafter proposes up to k tokens x_0..x_{k-1} (a draft model sampling with the
user's parameters, or prompt lookup copying from earlier in the context); the target runs
one step of width k + 1 over [last token, x_0..x_{k-1}], which gives its filtered
distribution p_j after each prefix; `verify_block` keeps the longest accepted prefix and
adds one token of the target's (the residual draw at the first rejection, or the bonus token
when all k are accepted). Both caches then roll back what was not emitted.

Lossless: greedy, every emitted token is the target's argmax after the same prefix. At
temperature > 0, rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept x_j
with probability min(1, p_j(x_j) / q_j(x_j)), else draw from normalise(max(0, p_j - q_j));
p and q are the *filtered* distributions the sampler draws from (penalties over the history
including the earlier drafts, top-k, top-p, min-p, temperature), so the emitted tokens
follow the target's own sampling distribution. Prompt lookup's q is one-hot.

With a grammar (constraint.JsonConstraint), `DraftGrammar` follows it along each draft: the
draft model samples under the grammar's mask at every drafted position (q is masked), the
target's verify row j under the mask after the first j drafts (p is masked), a lookup draft
is cut before the first token the grammar refuses; then the grammar rolls back to where the
pass began, and the emitted tokens advance it, as the caches keep only what was emitted.

Draft length: the draft model stops where its most likely token's probability falls below
`P_MIN` (llama.cpp's p_min; read from the distribution, never from the token drawn, which
would skew the drafts verified), and `DraftLength` picks k for each pass from the acceptance
counts so far and the costs of a draft step and of a wider verify step relative to a plain
target step, measured once per model pair (`measure_costs`): with a seed, the lengths then
depend only on the tokens, and so does the output.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from diptych.errors import InvalidArgumentError

from .constraint import device_mask
from .generate import Emitter, Piece, Timings, check_finite, check_request
from .sampler import Sampler
from .sampling import SamplingParams

DEFAULT_DRAFT_MAX = 8     # most tokens drafted per pass (the caches roll back this far)
DEFAULT_LOOKUP_NGRAM = 3  # prompt lookup's fallback matches the last 3 tokens, then 2, then 1
ALIGN_WINDOW = 16         # prompt lookup aligns the last 16 tokens with earlier ones...
ALIGN_DECAY = 0.85        # ...each step back weighing this much less...
ALIGN_MIN = 0.5           # ...and copies where the weighted agreement reaches this
# the weight of the token j steps back; a window agreeing on none of its last ALIGN_ANY
# tokens cannot reach ALIGN_MIN (a shorter window's oldest tokens weigh less still)
_ALIGN_WEIGHTS = ALIGN_DECAY ** np.arange(ALIGN_WINDOW)
ALIGN_ANY = next(m for m in range(1, ALIGN_WINDOW + 1)
                 if _ALIGN_WEIGHTS[m:].sum() < ALIGN_MIN * _ALIGN_WEIGHTS.sum())
P_MIN = 0.75              # a draft model stops drafting below this top probability
EVIDENCE = 4              # drafts judged before a generation may decide drafting does not pay
PROBE_EVERY = 16          # while drafting does not pay, still draft one token this often...
PROBE_MAX = 512           # ...or, after failed probes, down to this seldom
CONFIRM = 3               # probes in a row that must succeed before drafting resumes
PROBE_CONTEXT = 16        # a draft model that fell further behind probes from this many tokens
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
    prompt lookup); `first`, the first token of verify width past 1, and `verify` each
    one after it (None: `first` is `verify`). A step of width 2 costs more than the wider
    steps' average extra token: on the CPU its two rows of x already leave the one-row
    kernels' single pass over the weights."""

    draft: float
    verify: float
    first: float | None = None

    def verify_width(self, extra: float, past_first: float) -> float:
        """The cost of verify widths past 1: `extra` (the expected) tokens past 1, of which
        `past_first` past the first."""
        first = self.verify if self.first is None else self.first
        return first * (extra - past_first) + self.verify * past_first


class DraftLength:
    """Chooses each pass's draft length k to maximise expected tokens per unit of cost.

    A drafter asked for k tokens draws the next one with probability c until it stops (a
    draft model stops when its top probability falls below P_MIN), and the target accepts
    each draft with probability a until the first rejection. A pass asking for k then emits
    1 + sum (ac)^i tokens (i = 1..k) on average and costs 1 + draft * sum c^i (i = 0..k-1:
    a draft model runs a step for each token it draws, the one that stopped it short
    included) + first * c + verify * sum c^i (i = 2..k). a and c are estimated from recent
    passes (older ones weigh less). For prompt lookup c = 1: finding nothing costs it
    nothing, and a match it finds runs long.

    A generation drafts until the target has judged EVIDENCE drafts (those up to a pass's
    first rejection; an empty draft counts one), whatever the prior says, as long as drafts
    that are always accepted would pay, and as many as would pay most then: the prior
    (a = 0.5) alone judged a 0.5B draft for a 1.5B target not worth a try, and every reply
    began with plain steps and probes; one draft a pass then gathered too little evidence
    to outweigh it.

    When no k > 0 pays, one token is still drafted every `probe_every` passes so that a
    change is noticed; each probe that fails doubles that interval (up to PROBE_MAX), so
    that on text the drafter cannot predict the probes cost next to nothing. A probe that
    succeeds is followed by more, one a pass, and drafting resumes after CONFIRM successes
    in a row: resuming costs a draft model a prefill of all it missed, which one lucky probe
    does not justify.
    """

    def __init__(self, draft_max: int, costs: Costs):
        self.draft_max, self.costs = draft_max, costs
        self.accepted, self.rejected = 0.5, 0.5   # prior: a = 0.5 (Jeffreys')
        self.stopped, self.tried = 0.0, 1.0       # prior: c = 1
        self.idle, self.probe_every, self.probing = 0, PROBE_EVERY, False
        self.drafting = True   # until a pass finds that no k > 0 pays
        self.judged = 0        # drafts judged so far (EVIDENCE)
        self.streak = 0   # probes in a row that succeeded

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def value(self, k: int, a: float | None = None) -> float:
        """Expected tokens per unit of cost of a pass asking for k drafts (plain: 1), at
        acceptance rate `a` (None: the estimate)."""
        if not k:
            return 1.0
        a = self.acceptance if a is None else a
        c = 1 - self.stopped / self.tried
        reach = [c ** i for i in range(k + 1)]   # the chance that draft i is drawn
        tokens = sum(a ** i * r for i, r in enumerate(reach))
        return tokens / (1 + self.costs.draft * sum(reach[:-1])
                         + self.costs.verify_width(sum(reach[1:]), sum(reach[2:])))

    def choose(self, limit: int) -> int:
        top = min(limit, self.draft_max)
        self.probing = False
        if self.drafting and self.judged < EVIDENCE:
            hoped = max(range(top + 1), key=lambda k: self.value(k, a=1.0))
            if hoped:
                return hoped
        best = max(range(top + 1), key=self.value)
        if self.drafting and best:
            return best
        self.drafting = False
        if top > 0:
            self.idle += 1
            if self.idle >= (1 if self.streak else self.probe_every):
                self.idle, self.probing = 0, True
                return 1
        return 0

    def record(self, asked: int, drafted: int, accepted: int) -> None:
        """A pass asked the drafter for `asked` tokens, got `drafted`, and the target
        accepted `accepted` of them."""
        if asked and self.costs.draft > 0:   # a draft model's stops (see the class)
            self.tried = DECAY * self.tried + min(drafted + 1, asked)
            self.stopped = DECAY * self.stopped + (drafted < asked)
        if asked:   # the drafts judged: up to the first rejection; an empty draft counts one
            self.judged += accepted + (accepted < drafted) if drafted else 1
        if drafted:
            self.accepted = DECAY * self.accepted + accepted
            self.rejected = DECAY * self.rejected + (accepted < drafted)
        if not self.probing:
            return
        if not drafted or accepted < drafted:
            self.probe_every = min(2 * self.probe_every, PROBE_MAX)
            self.streak = 0
            return
        self.probe_every, self.streak = PROBE_EVERY, self.streak + 1
        if self.streak >= CONFIRM:
            self.drafting, self.streak = True, 0


def _relative_times(fns: list, rounds: int = 5) -> list[float]:
    """Each function's wall time relative to the first's, the median over `rounds` rounds in
    which the functions run back to back: a burst of load on the machine then slows a
    round's calls alike, where the best time of each over the rounds could pick the first
    function's one quiet moment against the others' busy ones."""
    ratios = []
    for _ in range(rounds):
        times = []
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ratios.append([t / times[0] for t in times])
    return np.median(ratios, axis=0).tolist()


def _step(seq, token: int, width: int):
    """A step of `width` on `seq` that leaves it as it was (called once: the first call of
    a width may compile)."""
    be = seq.engine.backend

    def run():
        be.to_numpy(seq.step([token] * width)[0, -1, :1])
        seq.rollback(width)

    run()
    return run


def measure_costs(target, draft, width: int, token: int) -> Costs:
    """The costs of `DraftLength` for a target Sequence and a draft Sequence (None: prompt
    lookup), each step rolled back: target steps of width 1, 2 and `width`, and a draft
    step, rounded to COST_STEP."""
    def rounded(x: float) -> float:
        return round(max(x, 0.0) / COST_STEP) * COST_STEP

    steps = {w: _step(target, token, w) for w in sorted({1, min(2, width), width})}
    if draft is not None:
        steps["draft"] = _step(draft, token, 1)
    times = dict(zip(steps, _relative_times(list(steps.values()))))   # plain step: 1
    first = times[min(2, width)] - 1
    verify = (times[width] - times[2]) / (width - 2) if width > 2 else first
    return Costs(rounded(times.get("draft", 0.0)), rounded(verify), rounded(first))


def pass_costs(seq, draft, draft_max: int, token: int) -> Costs:
    """`measure_costs` for a target Sequence about to start a generation (its cache is reset
    first when a step of draft_max would not fit; the prompt is then prefilled anew)."""
    if seq.n_cached + draft_max > seq.capacity:
        seq.reset()
    return measure_costs(seq, draft, draft_max, token)


# -- grammars -------------------------------------------------------------------------------
class DraftGrammar:
    """A grammar followed along one pass's draft. `allowed[j]` is what it allows at verify
    row j (after the first j drafts); `push` a drafted token; `release` rolls the grammar
    back to where the pass began."""

    def __init__(self, constraint, eog_ids):
        self.constraint, self.eog_ids = constraint, eog_ids
        self.allowed = [constraint.allowed()]
        self.fed = 0
        self.ended = False

    def push(self, token: int) -> bool:
        """Follow a drafted token; False when the draft must end before it (the grammar
        refuses it, or an end-of-generation token came first)."""
        if self.ended or not self.allowed[-1][token]:
            return False
        if token in self.eog_ids:
            # generation ends at it if accepted: no row after it is ever drawn from
            self.ended = True
            self.allowed.append(self.allowed[-1])
        else:
            self.constraint.advance(token)
            self.fed += 1
            self.allowed.append(self.constraint.allowed())
        return True

    def rows(self, n_drafts: int) -> np.ndarray:
        """The allowed tokens of the n_drafts + 1 verify rows, (n_drafts + 1, V)."""
        return np.stack(self.allowed[:n_drafts + 1])

    def release(self) -> None:
        self.constraint.rollback(self.fed)
        self.fed = 0


# -- drafters -------------------------------------------------------------------------------
class ModelDraft:
    """A draft model's Sequence, drafting with the user's sampling parameters."""

    def __init__(self, seq, params: SamplingParams, target_vocab: int):
        self.seq, self.params, self.target_vocab = seq, params, target_vocab
        self.start = 0   # where in the context the draft's cache begins (see _sync)
        # its own random stream: drafts drawn with the target's uniforms would be correlated
        # with the target's tokens
        be, vocab = seq.engine.backend, seq.engine.cfg.vocab_size
        self.sampler = Sampler(be, replace(params, seed=_seed(params.seed, 1)), vocab)
        # a draft vocabulary padded past the target's drafts only ids the target has
        self.mask = None
        if vocab > target_vocab:
            self.mask = be.prepare_vector((np.arange(vocab) < target_vocab).astype(
                np.float32)).reshape(1, vocab) > 0

    def _sync(self, ctx: list[int], probe: bool = False):
        """The draft cache holding ctx[self.start:]; the logits after it (None for an empty
        ctx). A `probe` more than PROBE_CONTEXT tokens behind restarts the cache from ctx's
        last PROBE_CONTEXT tokens: catching up would cost it a prefill of every token it
        missed while idle, a share of the whole generation on every probe. Drafting for
        real takes the whole context again: with the recent tokens alone a draft model is
        less often sure, and less often right."""
        seq = self.seq
        if not probe:
            self.start = 0
        view = ctx[self.start:]
        keep = min(seq.cache.common_prefix(view), len(view) - 1)
        if probe and len(view) - keep > PROBE_CONTEXT:
            self.start = len(ctx) - PROBE_CONTEXT
            seq.reset()
            return seq.eval(ctx[self.start:])
        if seq.n_cached - keep <= seq.cache.max_rollback:
            seq.rollback(seq.n_cached - keep)
            missed = view[keep:]
            if not missed:
                return None
            # a pass's catch-up (its last draft and the target's token, typically) as a
            # fixed-width step, which the backend captures as it does verify steps; `eval`
            # would run the graph's prefill path for every catch-up of two tokens or more
            if len(missed) <= seq.cache.max_rollback + 1:
                return seq.step(missed)[0, -1:]
            return seq.eval(missed)
        return seq.prefill(view)

    def propose(self, ctx: list[int], k: int, grammar: DraftGrammar | None = None,
                probe: bool = False) -> tuple[list[int], np.ndarray | None]:
        """Up to k drafted tokens after ctx, and the (len, target vocab) q they were drawn
        from (None when greedy); with a `grammar`, each drawn under its mask and pushed. A
        `probe` (drafting does not pay so far) may draft from the recent context alone."""
        be, greedy = self.seq.engine.backend, self.params.greedy
        drafts, q = [], []
        with self.seq.lock:
            logits = self._sync(ctx, probe)
            history = self.sampler.history([ctx])
            for i in range(k):
                mask = self.mask if grammar is None else device_mask(
                    be, self._draft_width(grammar.allowed[-1])[None])
                drawn = self.sampler.sample(logits, history, mask=mask,
                                            probs=not greedy, logprobs=1)
                token = drawn.tokens[0]
                # the cut-off reads the distribution, never the token drawn from it: stopping
                # on the token would skew which drafts reach verification
                if not drawn.finite[0] or math.exp(drawn.top_logprobs[0, 0]) < P_MIN:
                    break
                if grammar is not None and not grammar.push(token):
                    break
                drafts.append(token)
                if not greedy:
                    q.append(self._target_width(be.to_numpy(drawn.probs)[0]))
                if grammar is not None and grammar.ended:
                    break
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

    def _draft_width(self, allowed: np.ndarray) -> np.ndarray:
        """A grammar's allowed target ids as a mask over the draft's vocabulary."""
        out = np.zeros(self.seq.engine.cfg.vocab_size, bool)
        n = min(len(out), len(allowed))
        out[:n] = allowed[:n]
        return out

    def settle(self, ctx: list[int]) -> None:
        """When generation ends, make the draft cache hold ctx[:-1] as the target's does,
        if that is a rollback and a few tokens; a draft left further behind (idle, or
        probing from the recent tokens) keeps only its common prefix with it: the next
        generation catches it up if it drafts at all."""
        seq, held = self.seq, ctx[:-1]
        with seq.lock:
            if len(held) - seq.cache.common_prefix(held) > PROBE_CONTEXT:
                seq.keep_prefix(held)
            else:
                self._sync(held)


class LookupDraft:
    """Prompt lookup: copy what followed an earlier place in the context. A deterministic
    draft: q is one-hot.

    The place is the one whose preceding ALIGN_WINDOW tokens agree best, position by
    position, with the context's last ones (recent positions weigh more, ALIGN_DECAY each
    step back), when that agreement reaches ALIGN_MIN: a copy with a token changed (an
    identifier renamed, a number edited) then resumes right after the changed token, where
    an n-gram match would jump to the latest occurrence of the new token and copy what
    followed it there. Otherwise the latest occurrence of the context's last n-gram (n from
    `ngram` down to 1).
    """

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, ctx: list[int], k: int, grammar: DraftGrammar | None = None,
                probe: bool = False) -> tuple[list[int], None]:
        """Up to k tokens; with a `grammar`, cut before the first it refuses."""
        ids = np.asarray(ctx)
        start = self._aligned(ids)
        if start is None:
            start = self._ngram(ids)
        drafts = [] if start is None else ids[start:start + k].tolist()
        if grammar is not None:
            drafts = list(itertools.takewhile(grammar.push, drafts))
        return drafts, None

    @staticmethod
    def _aligned(ids: np.ndarray) -> int | None:
        """Where the best-aligned earlier window's continuation starts (None: none aligns)."""
        w = min(ALIGN_WINDOW, len(ids) - 1)
        if w < 2:
            return None
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], w)
        # score only the windows that can reach ALIGN_MIN
        starts = np.unique(np.concatenate([
            np.flatnonzero(windows[:, w - 1 - j] == ids[-1 - j]) for j in range(min(ALIGN_ANY,
                                                                                  w))]))
        if not len(starts):
            return None
        weights = _ALIGN_WEIGHTS[w - 1::-1]
        score = (windows[starts] == ids[-w:]) @ weights
        best = int(np.flatnonzero(score == score.max())[-1])
        return int(starts[best]) + w if score[best] >= ALIGN_MIN * weights.sum() else None

    def _ngram(self, ids: np.ndarray) -> int | None:
        """Where the continuation of the latest occurrence of the longest match (up to
        `ngram` tokens) of the context's last tokens starts."""
        hits = np.flatnonzero(ids[:-1] == ids[-1])   # earlier occurrences of the last token
        if not len(hits):
            return None
        length = np.ones(len(hits), np.int64)
        run = np.ones(len(hits), bool)
        for j in range(1, min(self.ngram, len(ids) - 1)):
            run &= (hits >= j) & (ids[np.maximum(hits - j, 0)] == ids[-1 - j])
            length += run
        return int(hits[np.flatnonzero(length == length.max())[-1]]) + 1

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
def _verify(sampler: Sampler, logits, history, drafts: list[int], q, rng, mask=None):
    """The target's rows for one pass -> (drafts accepted, the target's token, finite flags
    of the rows used)."""
    k, vocab = len(drafts), sampler.vocab_size
    rows = None if history is None else sampler.history(row_histories(history, drafts))
    drawn = sampler.sample(logits, rows, mask=mask, probs=not sampler.params.greedy and k > 0)
    if not k:   # nothing drafted: the target's token, drawn as plain decoding draws it
        return 0, drawn.tokens[0], drawn.finite[:1]
    if sampler.params.greedy:
        n, token = greedy_block(drawn.tokens, drafts)
    else:
        p = sampler.backend.to_numpy(drawn.probs)
        q = one_hot(drafts, vocab) if q is None else q
        n, token = verify_block(p[None], q[None], np.asarray([drafts], np.int64).reshape(1, k),
                                rng)
        n, token = int(n[0]), int(token[0])
    return n, token, drawn.finite[:n + 1]


class SpeculativeGeneration:
    """One speculative generation on a target Sequence, a pass at a time (as
    generate.Generation is a token at a time): `start()` prefills and returns the first
    token's pieces, each `step()` one pass's; the generation has ended once a piece has a
    finish_reason. `constraint`: None, or a grammar every token must follow."""

    def __init__(self, seq, tokenizer, prompt_ids: list[int], max_tokens: int,
                 params: SamplingParams, stop: list[str] | None, drafter, length: DraftLength,
                 constraint=None):
        self.budget = check_request(seq, prompt_ids, max_tokens)
        self.seq, self.drafter, self.length = seq, drafter, length
        self.prompt_ids, self.constraint = prompt_ids, constraint
        self.eog_ids = tokenizer.eog_ids
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self.sampler = Sampler(seq.backend, params, seq.cfg.vocab_size)
        self.out = Emitter(tokenizer, stop, self.budget, self.sampler.history([prompt_ids]),
                           self.timings, constraint)
        # the acceptance and residual draws; the sampler's generator draws the rest
        self.rng = np.random.default_rng(_seed(params.seed, 2))
        self.ctx = list(prompt_ids)
        self._t0 = 0.0

    def start(self) -> list[Piece]:
        t0 = time.perf_counter()
        logits = self.seq.prefill(self.prompt_ids)
        self.timings.prefill_s = time.perf_counter() - t0
        self._t0 = time.perf_counter()
        mask = None if self.constraint is None else self.constraint.mask(self.seq.backend)
        drawn = self.sampler.sample(logits, self.out.history, mask=mask)
        check_finite(drawn.finite, len(self.prompt_ids))
        return self._emit([drawn.tokens[0]])

    def step(self) -> list[Piece]:
        """One pass: draft, verify, emit, roll back what was not emitted."""
        seq, ctx, timings = self.seq, self.ctx, self.timings
        left = self.budget - timings.generated_tokens
        k = self.length.choose(min(left - 1, seq.capacity - len(ctx)))
        grammar = None if self.constraint is None else DraftGrammar(self.constraint,
                                                                    self.eog_ids)
        drafts, q = self.drafter.propose(ctx, k, grammar, self.length.probing) if k \
            else ([], None)
        mask = None
        if grammar is not None:
            mask = device_mask(seq.backend, grammar.rows(len(drafts)))
            grammar.release()   # the emitted tokens advance it again
        logits = seq.step([ctx[-1]] + drafts)[0]
        n, token, finite = _verify(self.sampler, logits, self.out.history, drafts, q,
                                   self.rng, mask)
        check_finite(finite, len(ctx))
        timings.drafted += len(drafts)
        timings.accepted += n
        timings.verify_passes += 1
        self.length.record(k, len(drafts), n)
        pieces = self._emit(emitted_tokens(drafts, n, token))
        # the target now holds the old ctx[:-1] and the k + 1 tokens fed: keep the new ctx[:-1]
        seq.rollback(seq.n_cached - (len(ctx) - 1))
        timings.decode_s = time.perf_counter() - self._t0
        return pieces

    def _emit(self, tokens: list[int]) -> list[Piece]:
        pieces = []
        for t in tokens:
            pieces.append(self.out.emit(t))
            self.ctx.append(t)
            if pieces[-1].finish_reason:
                self.drafter.settle(self.ctx)
                break
        return pieces


def stream_speculative(engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                       params: SamplingParams, stop: list[str] | None, drafter,
                       length: DraftLength, constraint=None) -> Iterator[Piece]:
    """`stream_tokens` with speculative passes on the engine's first sequence."""
    gen = SpeculativeGeneration(engine.main, tokenizer, prompt_ids, max_tokens, params, stop,
                                drafter, length, constraint)
    pieces = gen.start()
    while True:
        yield from pieces
        if pieces[-1].finish_reason:
            return
        pieces = gen.step()
