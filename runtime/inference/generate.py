"""The decode loop: prefill, sample, stream text pieces, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from diptych.errors import ContextOverflowError, GenerationSuperseded, NumericalError, SamplingError
from diptych.text.detokenize import StopMatcher, StreamDecoder
from .sampler import Sampler, TokenHistory
from .sampling import SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    # speculative decoding: tokens drafted, drafts the target accepted, target verify passes
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill logits; decode makes the others
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each verify pass emitted (its accepted drafts and the target's own)."""
        return (self.accepted + self.verify_passes) / self.verify_passes if self.verify_passes \
            else 0.0


@dataclass
class TokenLogprob:
    """A drawn token's log-probability under the model's own distribution (the log-softmax
    of its raw logits, before any filter), and the `top` likeliest (id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """One streamed piece: new text, the token ids it came from, and the running timings.

    The last piece has `finish_reason` set: "stop" (end-of-generation token or stop
    string) or "length" (max_tokens reached, or the context filled up). `logprobs` holds
    one `TokenLogprob` per token id when they were asked for.
    """

    text: str
    token_ids: list[int]
    timings: Timings
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


def check_request(engine, prompt_ids: list[int], max_tokens: int) -> int:
    """The number of tokens a generation may emit: max_tokens, less where the context ends."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise SamplingError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not prompt_ids:
        raise SamplingError("the prompt is empty (no tokens)")
    capacity = engine.capacity
    if len(prompt_ids) >= capacity:
        raise ContextOverflowError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {capacity}; "
            f"load the model with a larger n_ctx (--n-ctx) or shorten the prompt")
    return min(max_tokens, capacity - len(prompt_ids))


def check_finite(finite: list[bool], n_tokens: int) -> None:
    """NumericalError unless every row the generation used had finite logits."""
    if not all(finite):
        raise NumericalError.logits(f"after {n_tokens} generated tokens")


class Emitter:
    """What happens to each token a generation chose, plain or speculative alike: it counts,
    advances the grammar (`constraint`), joins the penalty history, ends generation
    (end-of-generation token, stop string, `budget` reached) or becomes text. The last
    piece has its finish_reason set."""

    def __init__(self, tokenizer, stop: list[str] | None, budget: int,
                 history: TokenHistory | None, timings: Timings, constraint=None):
        self.eog_ids = tokenizer.eog_ids
        self.decoder, self.matcher = StreamDecoder(tokenizer), StopMatcher(stop or [])
        self.budget, self.history, self.timings = budget, history, timings
        self.constraint = constraint

    def emit(self, token: int, logprobs: list[TokenLogprob] | None = None) -> Piece:
        t = self.timings
        t.generated_tokens += 1
        if token in self.eog_ids:
            return Piece(self.matcher.flush() + self.decoder.flush(), [token], t, "stop",
                         logprobs)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.history is not None:
            self.history.append([token])
        text, stopped = self.matcher.feed(self.decoder.push(token))
        if stopped:
            return Piece(text, [token], t, "stop", logprobs)
        if t.generated_tokens == self.budget:
            return Piece(text + self.matcher.flush() + self.decoder.flush(), [token], t,
                         "length", logprobs)
        return Piece(text, [token], t, logprobs=logprobs)


def stream_tokens(engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                  params: SamplingParams, stop: list[str] | None = None,
                  logprobs: int | None = None, constraint=None) -> Iterator[Piece]:
    """Generate after `prompt_ids` on `engine` (an Engine, or one of its Sequences); see
    `Generation` for the arguments."""
    gen = Generation(engine, tokenizer, prompt_ids, max_tokens, params, stop, logprobs,
                     constraint)
    logits = gen.prefill()
    while True:
        piece = gen.take(logits)
        yield piece
        if piece.finish_reason is not None:
            return
        logits = engine.eval(piece.token_ids)


class Generation:
    """One generation's policy, a token at a time; whoever drives it runs the model.

    `prefill()` feeds the prompt and returns its logits; `take(logits)` draws the next token
    from a (1, vocab) logits row and returns its Piece; until a piece has a finish_reason,
    the driver feeds that piece's token and passes the resulting logits to `take` again
    (`stream_tokens` does so one sequence at a time; a server may batch several
    generations' steps with `Engine.decode_rows`).

    `logprobs`: None, or n >= 0 to give each piece its token's logprob and the top n.
    `constraint`: None, or a grammar (constraint.JsonConstraint) every token must follow.
    """

    def __init__(self, engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                 params: SamplingParams, stop: list[str] | None = None,
                 logprobs: int | None = None, constraint=None):
        budget = check_request(engine, prompt_ids, max_tokens)
        self.engine, self.prompt_ids = engine, prompt_ids
        self.logprobs, self.constraint = logprobs, constraint
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self.sampler = Sampler(engine.backend, params, engine.cfg.vocab_size)
        self.out = Emitter(tokenizer, stop, budget, self.sampler.history([prompt_ids]),
                           self.timings, constraint)
        self._t0 = 0.0

    def prefill(self):
        t0 = time.perf_counter()
        logits = self.engine.prefill(self.prompt_ids)
        self.timings.prefill_s = time.perf_counter() - t0
        self._t0 = time.perf_counter()
        return logits

    def take(self, logits) -> Piece:
        timings, constraint, logprobs = self.timings, self.constraint, self.logprobs
        if timings.generated_tokens:
            timings.decode_s = time.perf_counter() - self._t0
        mask = None if constraint is None else constraint.mask(self.engine.backend)
        drawn = self.sampler.sample(logits, self.out.history, mask=mask, logprobs=logprobs)
        check_finite(drawn.finite, len(self.prompt_ids) + timings.generated_tokens)
        token = drawn.tokens[0]
        lp = None if logprobs is None else [TokenLogprob(
            token, float(drawn.logprob[0]),
            [(int(t), float(v)) for t, v in zip(drawn.top_ids[0], drawn.top_logprobs[0])])]
        return self.out.emit(token, lp)


def exclusive(engine, pieces: Iterator[Piece]) -> Iterator[Piece]:
    """`pieces` run as the engine's one generation.

    The generation claims the cache when it starts (at its first step, as generators run
    lazily) and each step runs under the engine's lock, so two threads never interleave
    inside a step. A generation started later, on this thread or another, supersedes this
    one: its next step raises `GenerationSuperseded` instead of continuing from a cache
    that now holds the other prompt."""
    ticket = None
    try:
        while True:
            with engine.lock:
                if ticket is None:
                    ticket = engine.claim()
                elif not engine.holds(ticket):
                    raise GenerationSuperseded(
                        "another generation started on this model and replaced this one; "
                        "a model generates one sequence at a time (load a second Model for "
                        "two at once)")
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece
    finally:
        pieces.close()
        if ticket is not None:
            with engine.lock:
                engine.release(ticket)
