"""Chats and messages in SQLite.

WAL journaling lets two app instances read and write the same file at once (writers wait up
to `BUSY_TIMEOUT_S` for each other); every change is one short transaction, so a crash or
Ctrl+C loses nothing that was committed. A reply being generated is a row updated as it
streams, so a crash mid-reply keeps what had arrived.

A store can also live in memory: empty, or as a copy of a database that cannot be written
(see `store_recovery`); then nothing outlives the app.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from diptych.errors import DiptychError

from .chat_settings import ChatSettings

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id       INTEGER PRIMARY KEY,
    title    TEXT NOT NULL,
    model    TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role    TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
CREATE TABLE IF NOT EXISTS preferences (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreError(DiptychError):
    """The chat database cannot be used as it is."""


class StoreDamaged(StoreError):
    """The database file is corrupt or truncated."""


class StoreTooNew(StoreError):
    """The database was written by a newer diptych."""


@dataclass
class Chat:
    id: int
    title: str
    model: str
    settings: ChatSettings
    updated: float


@dataclass
class Message:
    id: int
    role: str
    content: str


class Store:
    """The chats of the database at `path`.

    mode "write": read and written there (created if missing). "copy": held in memory, as a
    copy of the database read without writing anything beside it (none: empty), for a
    database that cannot be written. "empty": an empty store in memory.
    """

    def __init__(self, path: Path, mode: str = "write"):
        self.path = Path(path)
        if mode == "write":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode; `with self._transaction():` below opens and commits one
            # transaction
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            self.db = sqlite3.connect(":memory:", isolation_level=None)
        try:
            if mode == "write":
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            elif mode == "copy" and self.path.is_file():
                self._copy_into_memory()
            self.db.execute("PRAGMA foreign_keys=ON")
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            self._migrate()
        except BaseException as exc:
            self.db.close()
            if isinstance(exc, sqlite3.DatabaseError) and \
                    not isinstance(exc, sqlite3.OperationalError):  # not a file it cannot open
                raise StoreDamaged(f"{self.path} is damaged ({exc})") from exc
            raise

    def _copy_into_memory(self) -> None:
        # Reading in place would write beside the file (WAL needs a -shm file), so the
        # database and its write-ahead log are read from a temporary copy.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / self.path.name
            for suffix in ("", "-wal"):
                if Path(f"{self.path}{suffix}").is_file():
                    shutil.copyfile(f"{self.path}{suffix}", f"{copy}{suffix}")
            source = sqlite3.connect(copy)
            try:
                source.backup(self.db)
            finally:
                source.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreTooNew(f"{self.path} has schema version {version}; this diptych "
                              f"reads up to {SCHEMA_VERSION}: upgrade diptych")
        if version < SCHEMA_VERSION:
            with self._transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _transaction(self):
        # BEGIN IMMEDIATE takes the write lock up front, so two instances queue instead of
        # failing halfway through a transaction
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def close(self) -> None:
        self.db.close()

    # -- chats ---------------------------------------------------------------------------------
    def new_chat(self, title: str, settings: ChatSettings, model: str = "") -> Chat:
        now = time.time()
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO chats(title, model, settings, created, updated) VALUES (?,?,?,?,?)",
                (title, model, json.dumps(settings.to_dict()), now, now))
        return Chat(cur.lastrowid, title, model, settings, now)

    def chats(self) -> list[Chat]:
        rows = self.db.execute(
            "SELECT id, title, model, settings, updated FROM chats ORDER BY updated DESC, id DESC")
        return [self._chat(r) for r in rows]

    def chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute("SELECT id, title, model, settings, updated FROM chats WHERE id=?",
                              (chat_id,)).fetchone()
        return self._chat(row) if row else None

    @staticmethod
    def _chat(row) -> Chat:
        return Chat(row[0], row[1], row[2], ChatSettings.from_json(row[3])[0], row[4])

    def settings_problems(self) -> list[str]:
        """One line for each chat whose stored settings cannot all be read."""
        out = []
        for title, text in self.db.execute("SELECT title, settings FROM chats ORDER BY id"):
            _, problems = ChatSettings.from_json(text)
            if problems:
                out.append(f"“{title}”: {', '.join(problems)}")
        return out

    def rename_chat(self, chat_id: int, title: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE chats SET title=? WHERE id=?", (title, chat_id))

    def set_chat_settings(self, chat_id: int, settings: ChatSettings) -> None:
        with self._transaction():
            self.db.execute("UPDATE chats SET settings=? WHERE id=?",
                            (json.dumps(settings.to_dict()), chat_id))

    def set_chat_model(self, chat_id: int, model: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE chats SET model=? WHERE id=?", (model, chat_id))

    def delete_chat(self, chat_id: int) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM chats WHERE id=?", (chat_id,))

    # -- messages ------------------------------------------------------------------------------
    def add_message(self, chat_id: int, role: str, content: str) -> Message:
        now = time.time()
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO messages(chat_id, role, content, created) VALUES (?,?,?,?)",
                (chat_id, role, content, now))
            self.db.execute("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
        return Message(cur.lastrowid, role, content)

    def update_message(self, message_id: int, content: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE messages SET content=? WHERE id=?", (content, message_id))

    def delete_messages(self, message_ids: list[int]) -> None:
        with self._transaction():
            self.db.executemany("DELETE FROM messages WHERE id=?", [(i,) for i in message_ids])

    def messages(self, chat_id: int, before_id: int | None = None,
                 limit: int | None = None) -> list[Message]:
        """The chat's messages in order; with `limit`, only the last `limit` of those before
        message `before_id` (all of them when it is None)."""
        rows = self.db.execute(
            "SELECT id, role, content FROM messages WHERE chat_id=? AND id<? "
            "ORDER BY id DESC LIMIT ?",
            (chat_id, before_id if before_id is not None else 2 ** 62,
             -1 if limit is None else limit)).fetchall()
        return [Message(*r) for r in reversed(rows)]

    def count_messages(self, chat_id: int, before_id: int | None = None) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM messages WHERE chat_id=? AND id<?",
            (chat_id, before_id if before_id is not None else 2 ** 62)).fetchone()[0]

    # -- preferences ---------------------------------------------------------------------------
    def preference(self, key: str, default=None):
        """The stored value, or `default` when there is none or it is not valid JSON."""
        row = self.db.execute("SELECT value FROM preferences WHERE key=?", (key,)).fetchone()
        try:
            return json.loads(row[0]) if row else default
        except (TypeError, ValueError):
            return default

    def set_preference(self, key: str, value) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO preferences(key, value) VALUES (?,?) "
                            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                            (key, json.dumps(value)))
