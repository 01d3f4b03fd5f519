"""The worker thread that runs every generation, so the event loop never waits on the model.

Requests queue as `Job`s. The thread gives each waiting job a free slot (`SlotPool`),
prefills its prompt there, and then decodes every running job together: one batched
forward per step (`Engine.decode_rows`) gives each its next token (continuous batching: a
job joins the batch after its prefill and leaves it when it ends). `/health` answers
meanwhile. A job that its client gave up on (`cancel`) is dropped before the next step,
which frees its slot: a disconnect costs at most the token being computed.
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

from .slots import Slot, SlotPool

log = logging.getLogger("diptych.server")

END = None  # the last item of every job's queue


class Job:
    """One request's generation. Its results arrive on `next()` in the event loop: `Piece`s,
    or an exception, then `END`."""

    def __init__(self, ids: list[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], logprobs: int | None, constraint=None):
        self.ids, self.params, self.max_tokens = ids, params, max_tokens
        self.stop, self.logprobs, self.constraint = stop, logprobs, constraint
        self.cached_tokens = 0      # prompt tokens the slot's cache already held
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
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
    gen: Generation | None = None
    token: int = -1          # the last token drawn, fed at the next step


class Scheduler:
    """Owns the slots and the thread that runs the model."""

    def __init__(self, model, slots: SlotPool):
        self.model, self.slots = model, slots
        self._waiting: deque[Job] = deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.tokens_generated = 0
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
                self._start(run)
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

    def _start(self, run: _Running) -> None:
        """Prefill a job's prompt in its slot (reusing what the slot holds) and draw its
        first token."""
        job, m = run.job, self.model
        try:
            run.gen = Generation(run.slot.sequence, m.tokenizer, job.ids, job.max_tokens,
                                 job.params, job.stop, job.logprobs, job.constraint)
            piece = run.gen.take(run.gen.prefill())
        except Exception as exc:  # noqa: BLE001 - reported to its client
            self._finish(run, exc)
            return
        job.cached_tokens = run.slot.sequence.reused
        self._publish(run, piece)

    def _decode(self) -> None:
        """One step of every running generation, as one batched forward."""
        for run in [r for r in self._running if r.job.cancelled]:
            self._finish(run)
        if not self._running:
            return
        rows = list(self._running)
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
                self._publish(run, piece)

    def _publish(self, run: _Running, piece: Piece) -> None:
        self.tokens_generated += len(piece.token_ids)
        run.job.put(piece)
        if piece.finish_reason is not None:
            self._finish(run)
        else:
            run.token = piece.token_ids[-1]

    def _finish(self, run: _Running, failure: BaseException | None = None) -> None:
        if failure is not None:
            if not isinstance(failure, DiptychError):
                log.error("generation failed", exc_info=failure)
            run.job.put(failure)
        self._running.remove(run)
        self.slots.release(run.slot)
        run.job.put(END)
