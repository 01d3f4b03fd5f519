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
class Piece:
    """One streamed piece: new text, the token ids it came from, and the running timings.

    The last piece has `finish_reason` set: "stop" (end-of-generation token or stop
    string) or "length" (max_tokens reached, or the context filled up).
    """

    text: str
    token_ids: list[int]
    timings: Timings
    finish_reason: str | None = None


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
            f"load the model with a larger n_ctx or shorten the prompt")
    return min(max_tokens, capacity - len(prompt_ids))


def check_finite(finite: list[bool], n_tokens: int) -> None:
    """NumericalError unless every row the generation used had finite logits."""
    if not all(finite):
        raise NumericalError(
            f"the model computed NaN or infinite logits after {n_tokens} tokens: its weights "
            f"or settings are broken; generation stopped")


class Emitter:
    """What happens to each token a generation chose, plain or speculative alike: it counts,
    joins the penalty history, ends generation (end-of-generation token, stop string,
    `budget` reached) or becomes text. The last piece has its finish_reason set."""

    def __init__(self, tokenizer, stop: list[str] | None, budget: int,
                 history: TokenHistory | None, timings: Timings):
        self.eog_ids = tokenizer.eog_ids
        self.decoder, self.matcher = StreamDecoder(tokenizer), StopMatcher(stop or [])
        self.budget, self.history, self.timings = budget, history, timings

    def emit(self, token: int) -> Piece:
        t = self.timings
        t.generated_tokens += 1
        if token in self.eog_ids:
            return Piece(self.matcher.flush() + self.decoder.flush(), [token], t, "stop")
        if self.history is not None:
            self.history.append([token])
        text, stopped = self.matcher.feed(self.decoder.push(token))
        if stopped:
            return Piece(text, [token], t, "stop")
        if t.generated_tokens == self.budget:
            return Piece(text + self.matcher.flush() + self.decoder.flush(), [token], t,
                         "length")
        return Piece(text, [token], t)


def stream_tokens(engine, tokenizer, prompt_ids: list[int], max_tokens: int,
                  params: SamplingParams, stop: list[str] | None = None) -> Iterator[Piece]:
    budget = check_request(engine, prompt_ids, max_tokens)
    timings = Timings(prompt_tokens=len(prompt_ids))
    sampler = Sampler(engine.backend, params, engine.cfg.vocab_size)
    out = Emitter(tokenizer, stop, budget, sampler.history([prompt_ids]), timings)

    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids)
    timings.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        drawn = sampler.sample(logits, out.history)
        check_finite(drawn.finite, len(prompt_ids) + timings.generated_tokens)
        piece = out.emit(drawn.tokens[0])
        yield piece
        if piece.finish_reason:
            return
        logits = engine.eval(piece.token_ids)
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
