"""A chat's draft model for speculative decoding: loaded beside the chat's model when its
first speculative reply needs it, and kept while the model stays loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT = "default"  # the embedded default model, as the model picker names it


def draft_path(source: str) -> Path:
    """The file a chat's `draft` setting names: a path, or DEFAULT."""
    if source == DEFAULT:
        from diptych.sources.default_model import default_model_path

        return default_model_path()
    return Path(source).expanduser()


def attach_draft(model, source: str, progress: Callable[[int, int], None] | None = None) -> bool:
    """Let `model` draft with the model at `source` unless it does already; True when the
    draft was loaded now. It shares the model's backend and context size and its caches
    roll back as far as the model's; a tokenizer that differs from the model's is an
    IncompatibleDraftError."""
    from diptych import load

    path = draft_path(source)
    if model.draft is not None and model.draft.path.resolve() == path.resolve():
        return False
    draft = load(path, backend=model.backend, n_ctx=model.n_ctx,
                 draft_max=model.engine.max_rollback, progress=progress)
    model.attach_draft(draft, own=True)
    return True


def cache_bytes(model) -> tuple[int, int]:
    """Bytes of the model's caches and of its draft's (0 without a draft)."""
    draft = model.draft.engine.cache_bytes if model.draft is not None else 0
    return model.engine.cache_bytes, draft
