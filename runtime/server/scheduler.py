"""The worker thread that runs every generation, so the event loop never waits on the model.

Requests queue as `Job`s. The thread gives each waiting job a free slot (`SlotPool`),
prefills its prompt there (after what the slot's cache already holds), and then decodes
every running job together: one batched forward per step (`Engine.decode_rows`) gives each
its next token (continuous batching: a job joins the batch after its prefill and leaves it
when it ends). `/health` answers meanwhile. A job that its client gave up on (`cancel`) is
dropped before the next step, which frees its slot: a disconnect costs at most the token
being computed (`/health` counts such tokens: tokens_after_cancel).

A long prompt does not stall the others: each round feeds at most `prefill_chunk` tokens
of one job's prompt before the decode step, so running streams get a token per chunk.

A job that asks for speculative decoding runs one pass (draft, then one verify step of its
own) per round instead of joining the batch; its pieces come a pass at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

from diptych.errors import DiptychError
from diptych.inference.generate import Generation, Piece
from diptych.inference.sampling import SamplingParams
from diptych.inference.speculative import (DraftLength, LookupDraft, ModelDraft,
                                           SpeculativeGeneration, pass_costs)
from diptych.inference.speculative_costs import pair_costs

from .slots import Slot, SlotPool

log = logging.getLogger("diptych.server")

END = None  # the last item of every job's queue
PREFILL_CHUNK = 64  # most prompt tokens fed between two decode steps of the running jobs


@dataclass(frozen=True)
class Speculation:
    """How a job decodes speculatively: mode "draft" or "lookup", the most tokens drafted
    per pass, and prompt lookup's n-gram."""

    mode: str
    draft_max: int
    lookup_ngram: int


class Job:
    """One request's generation. Its results arrive on `next()` in the event loop: `Piece`s,
    or an exception, then `END`."""

    def __init__(self, ids: list[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], logprobs: int | None, constraint=None,
                 speculation: Speculation | None = None):
        self.ids, self.params, self.max_tokens = ids, params, max_tokens
        self.stop, self.logprobs, self.constraint = stop, logprobs, constraint
        self.speculation = speculation
        self.cached_tokens = 0      # prompt tokens the slot's cache already held
        self.generated = 0          # tokens published so far
        self.cancelled = False
        self.generated_at_cancel = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        if not self.cancelled:
            self.generated_at_cancel = self.generated
            self.cancelled = True

    async def next(self) -> Piece | BaseException | None:
        return await self._queue.get()

    def put(self, item) -> None:
        """From the worker thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


@dataclass(eq=False)
class _Running:
    job: Job
    slot: Slot
    gen: Generation | SpeculativeGeneration | None = None
    token: int = -1          # the last token drawn, fed at the next step
    fed: int = 0             # prompt tokens the slot's cache holds while it prefills
    prefilling: bool = True

    @property
    def batched(self) -> bool:
        return isinstance(self.gen, Generation)


class Scheduler:
    """Owns the slots and the thread that runs the model."""

    def __init__(self, model, slots: SlotPool, prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
        self._waiting: deque[Job] = deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.tokens_generated = 0
        # of the finished speculative jobs
        self.verify_passes = self.tokens_drafted = self.drafts_accepted = 0
        # tokens made for jobs after their client had gone (a disconnect's cost)
        self.tokens_after_cancel = 0
        self._costs: dict = {}   # (mode, draft_max) -> Costs (speculative_costs.py)
        self._thread = threading.Thread(target=self._run, name="diptych-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                started = self._admit()
            for run in started:
                self._begin(run)
            self._prefill()
            self._decode()
        for run in list(self._running):
            self._finish(run)

    def _admit(self) -> list[_Running]:
        """Give waiting jobs, oldest first, the free slots (called holding _wake)."""
        started = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                job.put(END)
                continue
            slot = self.slots.acquire(job.ids)
            if slot is None:
                break
            self._waiting.popleft()
            run = _Running(job, slot)
            self._running.append(run)
            started.append(run)
        return started

    def _begin(self, run: _Running) -> None:
        """A job's generation, and what of its prompt the slot's cache already holds."""
        try:
            run.gen = self._generation(run)
        except Exception as exc:  # noqa: BLE001 - reported to its client
            self._finish(run, exc)
            return
        run.fed = run.slot.sequence.keep_prefix(run.job.ids)
        # the last prompt token is fed again whatever the cache holds: its logits are needed
        run.job.cached_tokens = min(run.fed, len(run.job.ids) - 1)

    def _prefill(self) -> None:
        """Feed one chunk of the oldest prefilling job's prompt; the last chunk goes through
        the generation's own prefill, which draws the first token."""
        run = next((r for r in self._running if r.prefilling), None)
        if run is None:
            return
        ids, seq = run.job.ids, run.slot.sequence
        try:
            if len(ids) - run.fed > self.prefill_chunk:
                seq.eval(ids[run.fed:run.fed + self.prefill_chunk])
                run.fed += self.prefill_chunk
                return
            run.prefilling = False
            pieces = run.gen.start() if not run.batched else [run.gen.take(run.gen.prefill())]
        except Exception as exc:  # noqa: BLE001
            self._finish(run, exc)
            return
        self._publish(run, pieces)

    def _generation(self, run: _Running):
        job, slot, m = run.job, run.slot, self.model
        spec = job.speculation
        if spec is None:
            return Generation(slot.sequence, m.tokenizer, job.ids, job.max_tokens, job.params,
                              job.stop, job.logprobs, job.constraint)
        if spec.mode == "draft":
            drafter = ModelDraft(slot.draft, job.params, m.config.vocab_size)
        else:
            drafter = LookupDraft(spec.lookup_ngram)
        key = (spec.mode, spec.draft_max)
        if key not in self._costs:
            draft = slot.draft if spec.mode == "draft" else None
            self._costs[key] = pair_costs(
                m, spec.mode, spec.draft_max,
                lambda: pass_costs(slot.sequence, draft, spec.draft_max, job.ids[-1]))
        return SpeculativeGeneration(slot.sequence, m.tokenizer, job.ids, job.max_tokens,
                                     job.params, job.stop, drafter,
                                     DraftLength(spec.draft_max, self._costs[key]),
                                     job.constraint)

    def _decode(self) -> None:
        """One step of every running generation: the plain ones as one batched forward, then
        a pass of each speculative one."""
        for run in [r for r in self._running if r.job.cancelled]:
            self._finish(run)
        rows = [r for r in self._running if r.batched and not r.prefilling]
        if rows:
            self._decode_rows(rows)
        for run in [r for r in self._running if not (r.batched or r.prefilling)]:
            try:
                pieces = run.gen.step()
            except Exception as exc:  # noqa: BLE001
                self._finish(run, exc)
            else:
                self._publish(run, pieces)

    def _decode_rows(self, rows: list[_Running]) -> None:
        try:
            logits = self.model.engine.decode_rows([r.slot.sequence for r in rows],
                                                   [r.token for r in rows])
        except Exception as exc:  # noqa: BLE001
            for run in rows:
                self._finish(run, exc)
            return
        for b, run in enumerate(rows):
            try:
                piece = run.gen.take(logits[b:b + 1])
            except Exception as exc:  # noqa: BLE001
                self._finish(run, exc)
            else:
                self._publish(run, [piece])

    def _publish(self, run: _Running, pieces: list[Piece]) -> None:
        for piece in pieces:
            self.tokens_generated += len(piece.token_ids)
            run.job.generated += len(piece.token_ids)
            run.job.put(piece)
        if pieces[-1].finish_reason is not None:
            self._finish(run)
        else:
            run.token = pieces[-1].token_ids[-1]

    def _finish(self, run: _Running, failure: BaseException | None = None) -> None:
        if failure is not None:
            if not isinstance(failure, DiptychError):
                log.error("generation failed", exc_info=failure)
            run.job.put(failure)
        if run.job.cancelled:
            self.tokens_after_cancel += run.job.generated - run.job.generated_at_cancel
        if run.gen is not None:
            self.verify_passes += run.gen.timings.verify_passes
            self.tokens_drafted += run.gen.timings.drafted
            self.drafts_accepted += run.gen.timings.accepted
        self._running.remove(run)
        self.slots.release(run.slot)
        run.job.put(END)
