"""The worker thread that runs every generation, so the event loop never waits on the model.

Requests queue as `Job`s. The thread gives each waiting job a free slot (`SlotPool`) and
then steps the running jobs in turn, one token each, so concurrent clients all make
progress and `/health` answers meanwhile. A job that its client gave up on (`cancel`) is
dropped before its next step, which frees its slot: a disconnect costs at most the token
being computed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Iterator

from diptych.errors import DiptychError
from diptych.inference.generate import Piece, stream_tokens
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


class Scheduler:
    """Owns the slots and the thread that runs the model."""

    def __init__(self, model, slots: SlotPool):
        self.model, self.slots = model, slots
        self._waiting: deque[Job] = deque()
        self._running: list[tuple[Job, Slot, Iterator[Piece]]] = []
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
                self._admit()
            for entry in list(self._running):
                self._step(*entry)
        for job, slot, _ in self._running:
            job.put(END)

    def _admit(self) -> None:
        """Start waiting jobs, oldest first, while slots are free (called holding _wake)."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                job.put(END)
                continue
            slot = self.slots.acquire(job.ids)
            if slot is None:
                return
            self._waiting.popleft()
            m = self.model
            pieces = stream_tokens(slot.sequence, m.tokenizer, job.ids, job.max_tokens,
                                   job.params, job.stop, job.logprobs, job.constraint)
            self._running.append((job, slot, pieces))

    def _step(self, job: Job, slot: Slot, pieces: Iterator[Piece]) -> None:
        try:
            piece = None if job.cancelled else next(pieces, None)
        except DiptychError as exc:
            piece, failure = None, exc
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the log the rest
            log.exception("generation failed")
            piece, failure = None, exc
        else:
            failure = None
        if piece is not None:
            self.tokens_generated += len(piece.token_ids)
            if piece.timings.generated_tokens == 1:
                job.cached_tokens = slot.sequence.reused
            job.put(piece)
            if piece.finish_reason is None:
                return
        elif failure is not None:
            job.put(failure)
        pieces.close()
        self._running.remove((job, slot, pieces))
        self.slots.release(slot)
        job.put(END)
