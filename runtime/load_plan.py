"""The load plan: source -> config -> backend and context size -> memory check -> weights ->
engine, written once for `diptych.load`, `diptych info`/`bench`, the tests and the benchmarks.

`LoadPlan.open(...)` reads the source's metadata and tensor table, the model config, and
picks the backend and n_ctx; nothing is prepared or allocated until `engine()` (which checks
the memory estimate first), so `diptych info` reports the plan without building weights.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diptych.backends.base import Backend

from .errors import InvalidArgumentError
from .gc_pause import gc_paused
from .inference.cache import KVCache
from .inference.engine import Engine
from .inference.memory import activation_bytes, check_fits, choose_n_ctx
from .model.config import ModelConfig
from .model.families.gguf import config_from_gguf
from .model.weights import ModelWeights, load_weights
from .text.tokenizer import Tokenizer


#: Mapped bytes a load may have read before it lets their pages go (LoadPlan.weights).
RELEASE_BYTES = 64 << 20


def read_config(source) -> ModelConfig:
    """The ModelConfig of an opened source (anything with GGUF `.metadata` and `.tensors`)."""
    return config_from_gguf(source.metadata, {n: t.shape for n, t in source.tensors.items()})


def _check_sizes(n_batch, max_rollback) -> None:
    for name, value, least in (("n_batch", n_batch, 1), ("max_rollback", max_rollback, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass
class LoadPlan:
    """A model source opened and planned on a backend: what `engine()` will build."""

    path: Path | None    # None for a source built in memory
    source: Any          # GGUFFile, HFSource, or anything with .metadata and .tensors
    config: ModelConfig
    backend: Backend
    n_ctx: int
    n_batch: int
    max_rollback: int = 0  # tokens any sequence can roll back in place (a draft's length)

    @classmethod
    def open(cls, source: str | Path | None = None, backend: str | Backend = "auto", *,
             device: str | None = None, n_ctx: int | None = None,
             n_batch: int = 256, max_rollback: int = 0) -> LoadPlan:
        """Plan loading a .gguf file, a Hugging Face folder or a Hub name (`org/repo[:QUANT]`,
        downloaded once; None: the embedded default model) on `backend` ("auto" | "torch" |
        "mlx" | a Backend instance) and `device`."""
        from .sources.default_model import default_model_path
        from .sources.hf_folder import open_source
        from .sources.hub import local_path

        _check_sizes(n_batch, max_rollback)  # before opening: a vocabulary takes seconds to read
        path = local_path(source) if source is not None else default_model_path()
        # a Hugging Face folder reads as the GGUF file llama.cpp's converter would write
        return cls.from_source(open_source(path), backend, device=device, n_ctx=n_ctx,
                               n_batch=n_batch, max_rollback=max_rollback, path=path)

    @classmethod
    def from_source(cls, source, backend: str | Backend = "auto", *,
                    device: str | None = None, n_ctx: int | None = None, n_batch: int = 256,
                    max_rollback: int = 0, path: Path | None = None) -> LoadPlan:
        """Plan loading an already opened source."""
        from diptych.backends import select

        _check_sizes(n_batch, max_rollback)
        cfg = read_config(source)
        be = select(backend, device)
        return cls(path, source, cfg, be, choose_n_ctx(cfg, n_ctx, be.kv_bytes_per_element()),
                   n_batch, max_rollback)

    # -- memory ----------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of the tensors as stored (they stay quantized on the backend)."""
        return sum(t.nbytes for t in self.source.tensors.values())

    @property
    def cache_bytes(self) -> int:
        return KVCache.bytes_needed(self.config, self.n_ctx, self.backend.kv_bytes_per_element(),
                                    self.n_batch, self.max_rollback)

    @property
    def working_bytes(self) -> int:
        return activation_bytes(self.config, self.n_batch)

    def check_fits(self) -> None:
        """OutOfMemoryError when weights, cache and working memory exceed what is available."""
        name = self.path.name if self.path else self.config.name
        check_fits(self.weight_bytes, self.cache_bytes, self.working_bytes,
                   f"{name} with n_ctx={self.n_ctx}")

    # -- building --------------------------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf_metadata(self.source.metadata)

    def weights(self, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
        """Every tensor the graph needs, prepared on the backend; `progress(done, total)`
        receives bytes."""
        total, done, unreleased = self.weight_bytes, 0, 0
        release = getattr(self.source, "release_pages", None)  # a GGUFFile's mapped pages

        def step(n):
            nonlocal done, unreleased
            done += n
            unreleased += n
            # the pages of the tensors prepared so far go every RELEASE_BYTES, not after
            # each tensor: each call walks the page tables of the whole file
            if release and unreleased >= RELEASE_BYTES:
                release()
                unreleased = 0
            if progress:
                progress(done, total)

        # a model file's prepared weights may be kept for its next loads
        # (sources/prepared_cache.py)
        keep = (self.backend.keep_prepared(self.path) if self.path is not None
                and self.path.is_file() else nullcontext())
        with keep:
            weights = load_weights(self.source.tensors, self.config, self.backend, step)
        if release:
            release()
        return weights

    def engine(self, progress: Callable[[int, int], None] | None = None) -> Engine:
        """Check the memory estimate, prepare the weights, allocate the cache."""
        self.check_fits()
        with gc_paused():   # the weights: objects that live as long as the engine
            return Engine(self.backend, self.config, self.weights(progress), self.n_ctx,
                          self.n_batch, self.max_rollback)
