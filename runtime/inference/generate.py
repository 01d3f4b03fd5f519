"""The decode loop: prefill, sample, stream text pieces, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from diptych.errors import ContextOverflowError, GenerationSuperseded, NumericalError, SamplingError
from diptych.text.detokenize import StopMatcher, StreamDecoder
from .sampler import Sampler
from .sampling import SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill logits; decode makes the others
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0


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


def stream_tokens(engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                  params: SamplingParams, stop: list[str] | None = None,
                  logprobs: int | None = None, constraint=None) -> Iterator[Piece]:
    """Generate after `prompt_ids` on `engine` (an Engine, or one of its Sequences).
    `logprobs`: None, or n >= 0 to give each piece its token's logprob and the top n.
    `constraint`: None, or a grammar (constraint.JsonConstraint) every token must follow."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise SamplingError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not prompt_ids:
        raise SamplingError("the prompt is empty (no tokens)")
    capacity = engine.capacity
    if len(prompt_ids) >= capacity:
        raise ContextOverflowError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {capacity}; "
            f"load the model with a larger n_ctx or shorten the prompt")

    timings = Timings(prompt_tokens=len(prompt_ids))
    decoder, matcher = StreamDecoder(tokenizer), StopMatcher(stop or [])
    sampler = Sampler(engine.backend, params, engine.cfg.vocab_size)
    history = sampler.history([prompt_ids])

    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids)
    timings.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    budget = min(max_tokens, capacity - len(prompt_ids))
    for i in range(budget):
        mask = None if constraint is None else constraint.mask(engine.backend)
        drawn = sampler.sample(logits, history, mask=mask, logprobs=logprobs)
        if not drawn.finite[0]:
            raise NumericalError(
                f"the model computed NaN or infinite logits after {len(prompt_ids) + i} "
                f"tokens: its weights or settings are broken; generation stopped")
        token = drawn.tokens[0]
        timings.generated_tokens += 1
        lp = None if logprobs is None else [TokenLogprob(
            token, float(drawn.logprob[0]),
            [(int(t), float(v)) for t, v in zip(drawn.top_ids[0], drawn.top_logprobs[0])])]
        if token in tokenizer.eog_ids:
            yield Piece(matcher.flush() + decoder.flush(), [token], timings, "stop", lp)
            return
        if constraint is not None:
            constraint.advance(token)
        if history is not None:
            history.append([token])
        text, stopped = matcher.feed(decoder.push(token))
        if stopped:
            yield Piece(text, [token], timings, "stop", lp)
            return
        if i == budget - 1:
            yield Piece(text + matcher.flush() + decoder.flush(), [token], timings, "length",
                        lp)
            return
        yield Piece(text, [token], timings, logprobs=lp)
        logits = engine.eval([token])
        timings.decode_s = time.perf_counter() - t0


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
