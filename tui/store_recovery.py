"""Opening the chat store whatever state its folder is in.

The app always starts; what was wrong and what was done about it comes back as notices to
show, and nothing a user wrote is deleted:

- a damaged (corrupt or truncated) database is moved aside, kept under a new name, and a
  new one is started;
- a database written by a newer diptych is left as it is, and this session's chats are kept
  in memory;
- a database that cannot be written (a read-only folder or file) is read into memory: the
  chats are shown, and nothing of this session is saved;
- a data folder that cannot be made (a file in its place, no permission): this session's
  chats are kept in memory.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .store import Store, StoreDamaged, StoreError, StoreTooNew

NOT_SAVED = "This session's chats are kept in memory only and will not be saved."


def open_store(path: Path) -> tuple[Store, list[str]]:
    """The chat store at `path`, or the best stand-in for it, and notices for the user."""
    try:
        store, notices = Store(path), []
    except StoreDamaged as exc:
        store, notices = _replace_damaged(path, exc)
    except StoreTooNew as exc:
        store, notices = Store(path, "empty"), [f"{exc}. It is left as it is. {NOT_SAVED}"]
    except OSError as exc:   # the data folder cannot be made
        store, notices = Store(path, "empty"), [
            f"The data folder {path.parent} cannot be used ({exc.strerror or exc}). "
            f"{NOT_SAVED}"]
    except sqlite3.OperationalError as exc:   # the database cannot be opened for writing
        store, notices = _read_only(path, exc)
    problems = store.settings_problems()
    if problems:
        notices.append("Settings that could not be read were ignored (defaults are used): "
                       + "; ".join(problems))
    return store, notices


def _replace_damaged(path: Path, exc: StoreDamaged) -> tuple[Store, list[str]]:
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        for suffix in ("", "-wal", "-shm"):   # the WAL holds data of the same database
            if (part := Path(f"{path}{suffix}")).exists():
                part.rename(f"{kept}{suffix}")
        store = Store(path)
    except (OSError, sqlite3.Error, StoreError) as again:
        return Store(path, "empty"), [
            f"{exc}, and it could not be moved aside ({again}). {NOT_SAVED}"]
    return store, [f"{exc}. It was kept as {kept.name} and a new chat database was started."]


def _read_only(path: Path, exc: sqlite3.OperationalError) -> tuple[Store, list[str]]:
    if not path.is_file():
        return Store(path, "empty"), [f"{path} cannot be created ({exc}). {NOT_SAVED}"]
    try:
        store = Store(path, "copy")
    except (sqlite3.Error, StoreError) as again:
        return Store(path, "empty"), [
            f"{path} cannot be opened ({exc}; read-only: {again}). {NOT_SAVED}"]
    return store, [f"{path} cannot be written ({exc}): your chats are shown, but nothing "
                   f"of this session will be saved."]
