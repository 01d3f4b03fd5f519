"""A file in our model cache: written by one process at a time, verified once, and verified
again whenever it changed.

Two first runs at once must not share a temporary name or both download: `locked(target)`
serialises them (an advisory `fcntl` lock on a `.lock` file beside the target), and each
writes its own temporary file, renamed into place once verified. The sha256 of a verified
file is recorded beside it with the size and modification time it had then; a file whose
size or modification time no longer match is hashed again before use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from diptych.errors import DefaultModelError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_intact(target: Path, sha256: str) -> bool:
    """True when `target` exists with content `sha256`: hashed only when it has no record or
    its size or modification time changed since it was recorded."""
    try:
        st = target.stat()
    except OSError:   # missing, or no folder where the cache should be
        return False
    try:
        record = json.loads(_record_path(target).read_text())
    except (OSError, ValueError):
        record = None
    if record == dict(sha256=sha256, **_stamp(st)):
        return True
    if sha256_file(target) != sha256:
        return False
    _write_record(target, sha256, st)
    return True


def _write_record(target: Path, sha256: str, st: os.stat_result) -> None:
    record = _record_path(target)
    with contextlib.suppress(OSError):   # a read-only cache still works, it just rehashes
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=record.name,
                                         delete=False) as f:
            json.dump(dict(sha256=sha256, **_stamp(st)), f)
        os.replace(f.name, record)


def install(partial: Path, target: Path, sha256: str) -> None:
    """Rename the verified `partial` to `target` and record its hash."""
    os.replace(partial, target)
    _write_record(target, sha256, target.stat())


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the cache lock of `target` (waits for another process that holds it)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(target.with_name(target.name + ".lock"), "a")
    except OSError as exc:
        raise DefaultModelError(f"cannot write to the model cache {target.parent}: "
                                f"{exc.strerror or exc}") from exc
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
