"""Engine: the model's weights and cache on a backend, and the chunked forward pass."""

from __future__ import annotations

import threading

import numpy as np

from diptych.backends.base import Step

from .cache import KVCache
from diptych.model.graph import forward


class Engine:
    """Runs token ids through the graph, keeping the cache's record of ids consistent.

    The cache only records a chunk after its forward pass completes, so an interrupt
    (Ctrl+C) mid-pass leaves the cache exactly as it was before that chunk.

    The cache holds one sequence, so it has one user at a time: whoever uses it holds `lock`
    and, to keep it between steps (a generation), `claim`s it; a newer claim supersedes the
    older one, which must then stop rather than continue from someone else's tokens.
    """

    def __init__(self, backend, cfg, weights, n_ctx: int, n_batch: int = 256):
        self.backend = backend
        self.cfg = cfg
        self.weights = weights
        self.n_batch = n_batch
        self.cache = KVCache(backend, cfg, n_ctx, n_batch)
        self._decode = backend.compile_step(self._decode_step)
        self.lock = threading.RLock()
        self._owner: object | None = None

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

    def _decode_step(self, tokens, positions, start: int):
        """One token through the graph: the step a backend may capture and replay."""
        step = Step(positions, start, 1)
        return forward(self.backend, self.cfg, self.weights, tokens, self.cache.storage, step)

    def eval(self, ids: list[int], all_logits: bool = False):
        """Append `ids` after what the cache holds.

        Returns the last position's logits as a backend (1, vocab) array, or with
        `all_logits` a numpy float32 (len(ids), vocab) array.
        """
        be = self.backend
        self.cache.check_fits(len(ids))
        with be.inference():
            return self._eval(ids, all_logits)

    def _eval(self, ids: list[int], all_logits: bool):
        be = self.backend
        rows, logits = [], None
        for lo in range(0, len(ids), self.n_batch):
            chunk = ids[lo:lo + self.n_batch]
            start, n = self.cache.length, len(chunk)
            positions, tokens = be.ids(np.arange(start, start + n)[None, :]), be.ids([chunk])
            if n == 1 and not all_logits:
                logits = self._decode(tokens, positions, start)
            else:
                at = np.arange(n) if all_logits else None
                logits = forward(be, self.cfg, self.weights, tokens, self.cache.storage,
                                 Step(positions, start, n), at)
            self.cache.commit(chunk)
            if all_logits:
                rows.append(be.to_numpy(logits[0]))
        if all_logits:
            return np.concatenate(rows) if rows else np.zeros((0, self.cfg.vocab_size), np.float32)
        return logits[0]

    def prefill(self, ids: list[int]):
        """Make the cache hold exactly `ids`, reusing the longest common prefix of token ids;
        returns the last position's logits.

        With sliding-window rings, the cache is snapshotted where the next turn's rewind
        will land: the end of the previous exchange (edit and resend) and the prompt
        without its last token (regenerate re-feeds that one token for its logits)."""
        cache = self.cache
        cache.snapshot()
        keep = cache.rewind(min(cache.common_prefix(ids), len(ids) - 1))
        if cache.rings and keep < len(ids) - 1:
            self.eval(ids[keep:-1])
            cache.snapshot()
            keep = len(ids) - 1
        return self.eval(ids[keep:])
