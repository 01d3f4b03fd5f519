"""Engine: the model's weights on a backend, and the sequences that run through them.

Each sequence (`Sequence`) has its own cache, so several can be interleaved (a server's
requests, a draft model's own sequence); the engine's first sequence is the batch-1 path
that `eval`/`prefill` use. Nothing outside this module touches a cache.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from diptych.backends.base import Step
from diptych.errors import InvalidArgumentError, OutOfMemoryError
from diptych.gc_pause import gc_paused
from diptych.model.graph import RowCaches, forward_rows
from diptych.model.graph import forward as run_graph

from .cache import KVCache
from .memory import available_bytes
from .slots import SlotPolicy

MAX_SNAPSHOTS = 3  # what a chat needs: regenerate, edit and resend, and the latest


class Sequence:
    """One sequence: its cache, the ids that cache holds, its captured steps.

    The cache only records a chunk after its forward pass completes, so an interrupt
    (Ctrl+C) mid-pass leaves the cache exactly as it was before that chunk.

    The cache holds one sequence, so it has one user at a time: whoever uses it holds `lock`
    and, to keep it between steps (a generation), `claim`s it; a newer claim supersedes the
    older one, which must then stop rather than continue from someone else's tokens.
    """

    def __init__(self, engine: Engine, cache: KVCache):
        self.engine = engine
        self.cache = cache
        self.slots = SlotPolicy(cache.specs)
        # the ring layers at a few earlier lengths, so that a long rewind (regenerate, edit
        # and resend) need not re-feed the whole conversation
        self.snapshots: list = []
        self._step = engine.backend.compile_step(self._run)
        self.lock = threading.RLock()
        self._owner: object | None = None
        self.reused = 0

    def claim(self) -> object:
        """Take the cache for a new user (call with `lock` held); returns its ticket."""
        self._owner = ticket = object()
        return ticket

    def holds(self, ticket: object) -> bool:
        """True while no later `claim` has superseded `ticket`."""
        return self._owner is ticket

    def release(self, ticket: object) -> None:
        if self._owner is ticket:
            self._owner = None

    # what `generate.stream_tokens` reads of whatever it runs on: an engine or a sequence
    @property
    def backend(self):
        return self.engine.backend

    @property
    def cfg(self):
        return self.engine.cfg

    @property
    def capacity(self) -> int:
        return self.engine.n_ctx

    @property
    def n_cached(self) -> int:
        return self.cache.length

    @property
    def tokens(self) -> list[int]:
        """The ids whose K/V the cache holds."""
        return list(self.cache.tokens)

    def _run(self, start: int, tokens, positions, *arrays):
        """The graph over tokens (1, T) from position `start`, logits at every position:
        the step a backend may capture (start is then frozen; the capture reads only the
        device arrays) and replay."""
        return self._graph(start, tokens, positions, arrays, np.arange(tokens.shape[1]))

    def _graph(self, start: int, tokens, positions, arrays: tuple, logits_at):
        n = tokens.shape[1]
        step = Step(positions, n, self.slots.views(arrays, start, n))
        e = self.engine
        return run_graph(e.backend, e.cfg, e.weights, tokens, self.cache.storage, step,
                         logits_at)

    def _inputs(self, ids: list[int]):
        be, start = self.engine.backend, self.cache.length
        n = len(ids)
        return (start, be.ids([ids]), be.ids(np.arange(start, start + n)[None, :]),
                *self.slots.arrays(be, start, n))

    def step(self, ids: list[int]):
        """A step of fixed width T = len(ids) (1 to decode, k + 1 to verify a draft), as the
        backend captures it: device logits (1, T, vocab) at every position."""
        self.cache.check_fits(len(ids))
        # a pass makes no garbage cycles, and a process's first pass loads the CPU kernels
        # (compiling those missing: numba's registries): collections during it would only
        # walk the heap (gc_pause.py)
        with self.engine.backend.inference(), gc_paused():
            logits = self._step(*self._inputs(ids))
        self.cache.commit(ids)
        return logits

    def forward(self, ids: list[int], logits_at: np.ndarray | None = None):
        """One pass of at most n_batch ids: device logits (1, len(logits_at), vocab) at those
        indices into ids (None: the last)."""
        self.cache.check_fits(len(ids))
        start, tokens, positions, *arrays = self._inputs(ids)
        with self.engine.backend.inference(), gc_paused():
            logits = self._graph(start, tokens, positions, tuple(arrays), logits_at)
        self.cache.commit(ids)
        return logits

    def eval(self, ids: list[int], all_logits: bool = False):
        """Append `ids` after what the cache holds, in chunks of n_batch.

        Returns the last position's logits as a backend (1, vocab) array, or with
        `all_logits` a numpy float32 (len(ids), vocab) array.
        """
        e = self.engine
        self.cache.check_fits(len(ids))
        rows, logits = [], None
        for lo in range(0, len(ids), e.n_batch):
            chunk = ids[lo:lo + e.n_batch]
            if len(chunk) == 1 and not all_logits:
                logits = self.step(chunk)
            else:
                logits = self.forward(chunk, np.arange(len(chunk)) if all_logits else None)
            if all_logits:
                rows.append(e.backend.to_numpy(logits[0]))
        if all_logits:
            return np.concatenate(rows) if rows else np.zeros((0, e.cfg.vocab_size), np.float32)
        return logits[0, -1:]

    def rollback(self, n: int) -> None:
        """Forget the last n tokens in place (n <= the engine's max_rollback)."""
        self.cache.rollback(n)

    def reset(self) -> None:
        self.cache.reset()
        self.snapshots.clear()

    def weights_changed(self) -> None:
        """The weights (their adapters) changed: supersede the cache's user, forget what
        the cache holds and any captured step (call with `lock` held)."""
        self.release(self.claim())
        self.reset()
        self._step = self.engine.backend.compile_step(self._run)

    def prefill(self, ids: list[int]):
        """Make the cache hold exactly `ids`, reusing the longest common prefix of token ids;
        returns the last position's logits.

        With sliding-window rings, the cache is snapshotted where the next turn's rewind
        will land: the end of the previous exchange (edit and resend) and the prompt
        without its last token (regenerate re-feeds that one token for its logits)."""
        cache = self.cache
        self._snapshot()
        keep = self._rewind(min(cache.common_prefix(ids), len(ids) - 1))
        self.reused = keep  # prompt tokens whose K/V this prefill did not recompute
        if cache.rings and keep < len(ids) - 1:
            self.eval(ids[keep:-1])
            self._snapshot()
            keep = len(ids) - 1
        return self.eval(ids[keep:])

    def keep_prefix(self, ids: list[int]) -> int:
        """Forget what the cache holds past its longest common prefix with `ids` (a chat whose
        last turn was taken back, or another chat opened); returns the length kept. Computes
        nothing: the next prefill feeds from there."""
        return self._rewind(self.cache.common_prefix(ids))

    def _snapshot(self) -> None:
        if any(ids == self.cache.tokens for ids, _ in self.snapshots):
            return
        snap = self.cache.snapshot()
        if snap is not None:
            self.snapshots = (self.snapshots + [snap])[-MAX_SNAPSHOTS:]

    def _rewind(self, length: int) -> int:
        """Keep the first `length` ids; returns the length actually kept, which the caller
        re-feeds from: in place where the rings allow it, else from the latest snapshot at
        or before `length` of this same sequence of ids, else from empty. Never attention
        over wrong keys."""
        cache = self.cache
        length = min(length, cache.length)
        if cache.can_truncate(length):
            cache.truncate(length)
            return length
        usable = [s for s in self.snapshots
                  if len(s[0]) <= length and cache.tokens[:len(s[0])] == s[0]]
        if not usable:
            cache.reset()
            return 0
        best = max(usable, key=lambda s: len(s[0]))
        cache.restore(best)
        return len(best[0])


class Engine:
    """Runs token ids through the graph, one sequence or several.

    `max_rollback` is how far any sequence can roll back in place (a speculative step's
    draft length); `cache_budget` bounds the bytes of all sequences' caches together (None:
    what memory is available when a sequence is opened).
    """

    def __init__(self, backend, cfg, weights, n_ctx: int, n_batch: int = 256,
                 max_rollback: int = 0, cache_budget: int | None = None):
        self.backend = backend
        self.cfg = cfg
        self.weights = weights
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.max_rollback = max_rollback
        self.cache_budget = cache_budget
        # the first sequence's cache is the one the load plan checked against memory
        self.main = Sequence(self, self._new_cache())
        self.sequences: list[Sequence] = [self.main]

    # -- sequences ---------------------------------------------------------------------------
    @property
    def sequence_bytes(self) -> int:
        """Cache bytes each sequence holds."""
        return self._sequence_bytes(self.max_rollback)

    def _sequence_bytes(self, max_rollback: int) -> int:
        return KVCache.bytes_needed(self.cfg, self.n_ctx, self.backend.kv_bytes_per_element(),
                                    self.n_batch, max_rollback)

    @property
    def cache_bytes(self) -> int:
        """Bytes the caches of every open sequence hold."""
        return sum(s.cache.nbytes for s in self.sequences)

    def cache_room(self) -> int:
        """Bytes left for more sequences' caches: the budget's rest, else what memory is
        available now."""
        if self.cache_budget is not None:
            return self.cache_budget - self.cache_bytes
        return available_bytes()

    def open_sequence(self, max_rollback: int | None = None) -> Sequence:
        """A new sequence with its own empty cache, which rolls back up to `max_rollback`
        tokens (None: the engine's); OutOfMemoryError beyond the budget."""
        max_rollback = self.max_rollback if max_rollback is None else max_rollback
        need, room = self._sequence_bytes(max_rollback), self.cache_room()
        if need > room:
            mib = 1 << 20
            raise OutOfMemoryError(
                f"another sequence's cache needs {need / mib:.1f} MiB but only "
                f"{max(room, 0) / mib:.1f} MiB is left of the cache budget; close a sequence "
                f"or load with a smaller n_ctx")
        seq = Sequence(self, self._new_cache(max_rollback))
        self.sequences.append(seq)
        return seq

    def decode_rows(self, seqs: list[Sequence], tokens: list[int]):
        """One decode step of several sequences at once: tokens[b] after what seqs[b]
        holds, each at its own position and in its own cache (graph.forward_rows: the
        weights read once for all rows). Returns device logits (B, vocab)."""
        if len(seqs) != len(tokens) or len({id(s) for s in seqs}) != len(seqs):
            raise InvalidArgumentError("decode_rows takes one token per distinct sequence")
        if len(seqs) == 1:
            return seqs[0].eval(tokens)   # the captured batch-1 step
        be, steps, positions = self.backend, [], []
        for seq in seqs:
            seq.cache.check_fits(1)
            start = seq.cache.length
            arrays = seq.slots.arrays(be, start, 1)
            steps.append(Step(be.ids([[start]]), 1, seq.slots.views(arrays, start, 1)))
            positions.append([start])
        with be.inference():
            logits = forward_rows(be, self.cfg, self.weights, be.ids([[t] for t in tokens]),
                                  be.ids(positions),
                                  RowCaches([s.cache.storage for s in seqs], steps))
        for seq, token in zip(seqs, tokens):
            seq.cache.commit([token])
        return logits[:, -1]

    def _new_cache(self, max_rollback: int | None = None) -> KVCache:
        return KVCache(self.backend, self.cfg, self.n_ctx, self.n_batch,
                       self.max_rollback if max_rollback is None else max_rollback)

    def close_sequence(self, seq: Sequence) -> None:
        """Free a sequence's cache (not the engine's first sequence)."""
        if seq is self.main:
            raise InvalidArgumentError("the engine's first sequence stays open")
        self.sequences.remove(seq)

    def set_adapters(self, change) -> None:
        """Run `change()` (which edits the weights' adapters) with every sequence locked,
        then invalidate each sequence's cache: its K/V came from the old weights."""
        with contextlib.ExitStack() as locks:
            for seq in self.sequences:
                locks.enter_context(seq.lock)
            change()
            for seq in self.sequences:
                seq.weights_changed()

    # -- the first sequence: the batch-1 path -------------------------------------------
    @property
    def capacity(self) -> int:
        return self.n_ctx

    @property
    def n_cached(self) -> int:
        return self.main.n_cached

    @property
    def tokens(self) -> list[int]:
        return self.main.tokens

    def eval(self, ids: list[int], all_logits: bool = False):
        return self.main.eval(ids, all_logits)

    def prefill(self, ids: list[int]):
        return self.main.prefill(ids)

    def step(self, ids: list[int]):
        return self.main.step(ids)

    def forward(self, ids: list[int], logits_at: np.ndarray | None = None):
        return self.main.forward(ids, logits_at)

    def rollback(self, n: int) -> None:
        self.main.rollback(n)

    def reset(self) -> None:
        self.main.reset()

    def keep_prefix(self, ids: list[int]) -> int:
        """`Sequence.keep_prefix` on the first sequence; an unfinished generation there is
        superseded (its next step raises GenerationSuperseded)."""
        with self.lock:
            self.release(self.claim())
            return self.main.keep_prefix(ids)

    @property
    def lock(self):
        return self.main.lock

    def claim(self) -> object:
        return self.main.claim()

    def holds(self, ticket: object) -> bool:
        return self.main.holds(ticket)

    def release(self, ticket: object) -> None:
        self.main.release(ticket)
