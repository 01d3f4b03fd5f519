"""Where diptych keeps downloaded models and other cached files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $DIPTYCH_CACHE, else $XDG_CACHE_HOME/diptych, else ~/.cache/diptych."""
    if env := os.environ.get("DIPTYCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diptych"


def models_dir() -> Path:
    """Downloaded models (the folder is made when the first one is written)."""
    return cache_dir() / "models"


def write_cached(path: Path, write) -> None:
    """`write(tmp)` a cache file and put it at `path` whole (quant.gguf_write.
    write_atomically), its folder made first. A cache that cannot be written is left
    unwritten: its reader computes the value again."""
    from diptych.errors import ModelFileError
    from diptych.quant.gguf_write import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
    except (OSError, ModelFileError):
        pass


def write_checked(path: Path, body: bytes) -> None:
    """Keep `body` at `path` behind a blake2b digest of it, for read_checked."""
    digest = hashlib.blake2b(body, digest_size=32).digest()
    write_cached(path, lambda tmp: tmp.write_bytes(digest + body))


def read_checked(path: Path) -> bytes | None:
    """What write_checked kept at `path`, or None when it is missing, short or damaged: a
    cache that is loaded as code (object code, Python bytecode) could crash the process
    rather than raise, so it is checked whole first."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    body = data[32:]
    if len(data) < 32 or hashlib.blake2b(body, digest_size=32).digest() != data[:32]:
        return None
    return body
