"""Speculative decoding's pass costs, measured once per model pair on a machine.

`DraftLength` weighs a pass by its costs relative to a plain target step
(`speculative.Costs`), which a model pair's first speculative generation measures: a few
steps of each width, from a fraction of a second to seconds. The costs are kept in the
cache folder (`speculative-costs.json`) under a key naming both model files (path, size,
modification time), the adapter, the backend and what sets its speed, and the draft
length. A later process reads them instead of measuring again, and so chooses the same
draft lengths as the first: with a seed, its output repeats too. Storing drops the
entries of files that are gone or changed. A cache file that cannot be read or written
costs a measurement, nothing else. A model built in memory (no file) is measured in each
process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from diptych.paths import cache_dir, write_cached

from .speculative import Costs

FILE_NAME = "speculative-costs.json"
MEASURING = "measuring speculative decoding's speed on this machine"


def _identity(path) -> str | None:
    """A model or adapter file (or folder) as its resolved path, size and modification time;
    None when there is none to name."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _files(model, mode: str) -> dict[str, tuple[str, str]] | None:
    """The files whose contents the costs of `model` drafting in `mode` depend on, as
    role -> (path, `_identity`); None when one has no file (a model built in memory)."""
    paths = {"model": model.path}
    if mode == "draft":
        paths["draft"] = model.draft.path
    if model.adapter:
        paths["adapter"] = model.adapter
    files = {role: (str(p), _identity(p)) for role, p in paths.items()}
    return None if any(known is None for _, known in files.values()) else files


def _key(model, mode: str, draft_max: int, files: dict) -> str:
    """The cache key of `model` (a diptych Model) drafting in `mode` ("draft": with its draft
    model; "lookup") up to `draft_max` tokens, given its `_files`."""
    return " | ".join([f"{role} {known}" for role, (_, known) in files.items()]
                      + [model.backend.speed_key(), f"{mode}, draft_max {draft_max}"])


def pair_costs(model, mode: str, draft_max: int, measure: Callable[[], Costs]) -> Costs:
    """The costs of `model` drafting in `mode` up to `draft_max` tokens: from the cache
    folder, else `measure()`d (told to the backend's first-use listener) and stored."""
    files = _files(model, mode)
    key = _key(model, mode, draft_max, files) if files is not None else None
    path = cache_dir() / FILE_NAME
    stored = _stored(_read(path).get(key)) if key is not None else None
    if stored is not None:
        return stored
    listener = model.backend.first_use_listener
    if listener is not None:
        listener(MEASURING)
    try:
        costs = measure()
    finally:
        if listener is not None:
            listener(None)
    if key is not None:
        _store(path, key, costs, files)
    return costs


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stored(entry) -> Costs | None:
    """An entry's costs, None unless they are what `measure_costs` gives (finite numbers
    >= 0; `first` may be None): a file edited by hand costs a measurement."""
    try:
        costs = Costs(**entry["costs"])
    except (KeyError, TypeError):
        return None
    values = [costs.draft, costs.verify] + ([] if costs.first is None else [costs.first])
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
             for v in values)
    return costs if ok else None


def _current(entry) -> bool:
    """Whether the files an entry was measured on are all there, unchanged."""
    try:
        return all(_identity(f) == known for f, known in entry["files"].items())
    except (KeyError, TypeError, AttributeError):
        return False


def _store(path: Path, key: str, costs: Costs, files: dict) -> None:
    """Add `key` to the file (read again first: another process may have added its own),
    without the entries of files gone or changed since, and replace the file whole, so
    that a reader never sees half of it."""
    data = {k: entry for k, entry in _read(path).items() if _current(entry)}
    data[key] = {"costs": asdict(costs),
                 "files": dict(files.values())}
    text = json.dumps(data, indent=1, sort_keys=True)
    write_cached(path, lambda tmp: tmp.write_text(text))   # a read-only cache measures again
