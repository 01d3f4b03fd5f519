"""The sampler: llama.cpp's sampling chain, written once over the backend's sampling ops.

For a block of logits rows (R, V) (the next position, or the k + 1 positions a speculative
step verifies), on the device, in the order of llama.cpp's default chain:

    token mask, logit_bias, penalties, top-k, top-p, min-p, temperature, draw

The mask (a grammar's allowed tokens) bans tokens before anything else sees them. top-p and
min-p look at the untempered distribution; min-p keeps the logits within log(min_p) of the
best one (p >= min_p * p_max), compared as llama.cpp compares them. Temperature 0 is greedy:
the best token after mask, bias and penalties. With top-k set, only k candidates are ever
sorted. Only the chosen ids, and the small results asked for, cross to the host, in one
transfer.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diptych.errors import SamplingError

from .sampling import SamplingParams


@dataclass
class Sampled:
    """One `Sampler.sample` call's results, per row.

    `finite`: whether the row's best candidate was finite. A NaN or +inf logit anywhere
    sorts first, and a row with no finite logit has a best of -inf, so this flags every
    row without a distribution (which drew an arbitrary token); -inf logits beside finite
    ones are tokens of probability 0, not a fault. `probs`: on request, the (R, V) device
    array each token was drawn from (the filters applied and renormalised; one-hot when
    greedy), the p and q of speculative rejection sampling. `logprob`, `top_ids`, `top_logprobs`: on request, under the model's
    own distribution (the log-softmax of the raw logits).
    """

    tokens: list[int]
    finite: list[bool]
    probs: Any = None
    logprob: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class TokenHistory:
    """The penalties' view of each row's past: its last `last_n` token ids and how often
    each occurs among them, kept on the host. Sampling hands the device only the distinct
    ids and their counts (`seen`): the penalties touch those logits, not the vocabulary.
    """

    def __init__(self, backend, vocab_size: int, last_n: int, rows: Sequence[Sequence[int]]):
        self.backend, self.vocab_size, self.last_n = backend, vocab_size, last_n
        self.windows = [deque(r, maxlen=last_n) for r in rows]
        for window in self.windows:
            self._check(window)
        self.counts = [Counter(window) for window in self.windows]
        self._seen: tuple[int, tuple] | None = None  # (rows, what seen() gives) until an append

    @property
    def rows(self) -> int:
        return len(self.windows)

    def append(self, tokens: Sequence[int]) -> None:
        """One new token per row."""
        if len(tokens) != self.rows:
            raise SamplingError(f"{len(tokens)} tokens for a history of {self.rows} rows")
        if not self.last_n:
            return
        self._check(tokens)
        for window, counts, token in zip(self.windows, self.counts, tokens):
            if len(window) == self.last_n:
                old = window[0]
                counts[old] -= 1
                if not counts[old]:
                    del counts[old]
            window.append(token)  # the deque drops the oldest
            counts[token] += 1
        self._seen = None

    def seen(self, rows: int):
        """Device (rows, U) ids and float32 counts of the distinct ids of each row's window
        (a one-row history serves every row), and whether a row is empty. A row with fewer
        than U ids repeats its last one; an empty row names id 0 with count 0."""
        if self._seen is None or self._seen[0] != rows:
            width = max([1, *map(len, self.counts)])
            idx = np.zeros((self.rows, width), np.int64)
            num = np.zeros((self.rows, width), np.float32)
            for r, counts in enumerate(self.counts):
                if counts:
                    n = len(counts)
                    idx[r, :n], num[r, :n] = list(counts), list(counts.values())
                    idx[r, n:], num[r, n:] = idx[r, n - 1], num[r, n - 1]
            if self.rows != rows:
                idx, num = np.repeat(idx, rows, 0), np.repeat(num, rows, 0)
            be = self.backend
            device = be.ids(idx), be.prepare_vector(num.reshape(-1)).reshape(num.shape)
            self._seen = rows, (*device, not all(self.counts))
        return self._seen[1]

    def _check(self, tokens) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise SamplingError(f"token id {int(bad[0])} is outside the vocabulary "
                                f"(0..{self.vocab_size - 1})")


class Sampler:
    """Draws tokens for one generation on one backend: the parameters, a random generator
    seeded from `params.seed` (the same seed gives the same tokens on the same backend),
    and the logit_bias as a device vector."""

    def __init__(self, backend, params: SamplingParams, vocab_size: int):
        self.backend, self.params, self.vocab_size = backend, params, vocab_size
        self.rng = backend.new_rng(params.seed)
        outside = [t for t, _ in params.logit_bias if t >= vocab_size]
        if outside:
            raise SamplingError(f"logit_bias names token {outside[0]}, outside the vocabulary "
                                f"(0..{vocab_size - 1})")
        self.bias = None
        if params.logit_bias:
            dense = np.zeros(vocab_size, np.float32)
            for token, bias in params.logit_bias:
                dense[token] = bias
            self.bias = backend.prepare_vector(dense).reshape(1, vocab_size)
        # llama.cpp's min-p bound on logits: the best plus logf(min_p), in float32
        self.min_p_offset = float(np.log(np.float32(params.min_p))) if params.min_p else None

    def history(self, rows: Sequence[Sequence[int]]) -> TokenHistory | None:
        """The penalty history of `rows` (token id lists), or None when no penalty is on."""
        p = self.params
        if not p.uses_history:
            return None
        return TokenHistory(self.backend, self.vocab_size, p.penalty_last_n, rows)

    def sample(self, logits, history: TokenHistory | None = None, *, mask=None,
               probs: bool = False, logprobs: int | None = None) -> Sampled:
        """One token per row of `logits`, a device (R, V) array.

        history: one row, or one per logits row; needed when a penalty is on.
        mask: a device bool array, (R, V) or (1, V); False bans a token.
        probs: also return each row's filtered distribution (on the device).
        logprobs: None, or n >= 0 for the chosen tokens' log-probabilities and the top n.
        """
        be, p = self.backend, self.params
        raw = be.float32(logits)
        rows, vocab = raw.shape
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= vocab):
            raise SamplingError(f"logprobs must be None or an integer in [0, {vocab}], "
                                f"got {logprobs!r}")
        x = raw if mask is None else be.where(mask, raw, -math.inf)
        if self.bias is not None:
            x = x + self.bias
        pen = None   # (ids, their penalised logits), put in place by the top-k
        if p.uses_history:
            if history is None:
                raise SamplingError("the penalties need the token history (Sampler.history)")
            if history.rows not in (1, rows):
                raise SamplingError(f"a history of {history.rows} rows for {rows} rows of "
                                    f"logits")
            pen = self._penalties(x, *history.seen(rows))
        if p.greedy:
            best, tokens = self._topk(x, pen, 1)
            finite = be.finite_rows(best).reshape(rows, 1)
            dist = (be.scatter_add(be.zeros((rows, vocab)), tokens, be.zeros((rows, 1)) + 1.0)
                    if probs else None)
        else:
            tokens, dist, finite = self._draw(x, pen, probs)

        parts = [be.float32(tokens), be.float32(finite)]
        if logprobs is not None:
            lp = be.log_softmax(raw)
            parts.append(be.gather(lp, tokens))
            if logprobs:
                top_lp, top_ids = be.topk(lp, logprobs)
                parts += [be.float32(top_ids), top_lp]
        # one transfer; ids are exact in float32 (vocabularies are far below 2**24)
        host = be.to_numpy(be.concat(parts))
        out = Sampled(tokens=host[:, 0].astype(np.int64).tolist(),
                      finite=(host[:, 1] > 0).tolist(), probs=dist)
        if logprobs is not None:
            out.logprob = host[:, 2]
            out.top_ids = host[:, 3:3 + logprobs].astype(np.int64)
            out.top_logprobs = host[:, 3 + logprobs:]
        return out

    def _topk(self, x, pen, k: int):
        """The k best of x with the penalised logits `pen` in place (None: no penalty);
        the backend need not write that copy of the row."""
        be = self.backend
        return be.topk(x, k) if pen is None else be.scatter_topk(x, *pen, k)

    def _penalties(self, x, idx, counts, empty_rows: bool):
        """(idx, their logits penalised): llama.cpp's penalties on the ids seen (`idx`, with
        their `counts`): repetition (divide a positive logit, multiply a negative one), then
        frequency per occurrence and presence. A penalty that is off costs no op (its
        arithmetic would give the same bits), nor does the count-0 guard while no row is
        empty."""
        be, p = self.backend, self.params
        rep = p.repetition_penalty
        seen = out = be.gather(x, idx)
        if rep != 1.0:
            out = be.where(seen <= 0, seen * rep, seen / rep)
        if p.frequency_penalty or p.presence_penalty:
            out = out - (counts * p.frequency_penalty + p.presence_penalty)
        if empty_rows:
            out = be.where(counts > 0, out, seen)
        return idx, out

    def _draw(self, x, pen, want_probs: bool):
        """top-k, top-p, min-p, temperature, then a draw -> ((R, 1) ids, dense probs,
        (R, 1) whether the best candidate was finite)."""
        be, p = self.backend, self.params
        rows, vocab = x.shape
        # top-p needs the candidates sorted: all of them when top-k is off
        k = p.top_k if 0 < p.top_k < vocab else (vocab if p.top_p < 1 else 0)
        if k:
            vals, idx = self._topk(x, pen, k)
        else:
            vals, idx = (x if pen is None else be.scatter(x, *pen)), None
        best = vals[:, :1] if idx is not None else be.topk(vals, 1)[0]
        finite = be.finite_rows(best).reshape(rows, 1)
        keep = None
        if p.top_p < 1:
            pr = be.softmax(vals)
            keep = be.cumsum(pr) - pr < p.top_p  # the token that reaches top_p stays
        if self.min_p_offset is not None:
            near = vals >= best + self.min_p_offset
            keep = near if keep is None else keep & near
        if keep is not None:
            vals = be.where(keep, vals, -math.inf)
        q = be.softmax(vals / p.temperature)
        # a non-finite row has no distribution; draw from its candidates uniformly rather
        # than hand NaNs to the draw (the row is flagged)
        q = be.where(finite, q, 1.0 / q.shape[-1])
        choice = be.categorical(q, self.rng).reshape(rows, 1)
        if idx is None:
            return choice, q if want_probs else None, finite
        dist = be.scatter_add(be.zeros((rows, vocab)), idx, q) if want_probs else None
        return be.gather(idx, choice), dist, finite
