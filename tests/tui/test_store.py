"""The chat database: a real SQLite file, reopened, shared by two writers at once."""

import sqlite3
import threading

import pytest

from diptych.tui.chat_settings import ChatSettings
from diptych.tui.store import SCHEMA_VERSION, Store, StoreError


def test_chats_and_messages_survive_reopening(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = Store(path)
    chat = store.new_chat("first", ChatSettings(system="Be brief.", temperature=0.2), "m.gguf")
    store.add_message(chat.id, "user", "hi")
    reply = store.add_message(chat.id, "assistant", "")
    store.update_message(reply.id, "hello!")
    store.set_preference("theme", "textual-light")
    store.close()

    store = Store(path)
    (again,) = store.chats()
    assert (again.title, again.model, again.settings.system, again.settings.temperature) == (
        "first", "m.gguf", "Be brief.", 0.2)
    assert [(m.role, m.content) for m in store.messages(chat.id)] == [
        ("user", "hi"), ("assistant", "hello!")]
    assert store.preference("theme") == "textual-light"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    store.rename_chat(chat.id, "renamed")
    store.delete_chat(chat.id)
    assert store.chats() == [] and store.messages(chat.id) == []  # messages cascade


def test_pages_of_older_messages(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat("long", ChatSettings())
    ids = [store.add_message(chat.id, "user", str(i)).id for i in range(10)]
    last3 = store.messages(chat.id, limit=3)
    assert [m.content for m in last3] == ["7", "8", "9"]
    assert store.count_messages(chat.id, last3[0].id) == 7
    assert [m.content for m in store.messages(chat.id, before_id=ids[7], limit=3)] == ["4", "5", "6"]


def test_two_instances_write_at_once(tmp_path):
    path = tmp_path / "chats.sqlite3"
    a, b = Store(path), Store(path)
    chat = a.new_chat("shared", ChatSettings())

    def write(n):
        store = Store(path)  # a connection per thread, as two app instances would have
        for i in range(50):
            store.add_message(chat.id, "user", f"{n}:{i}")
        store.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.count_messages(chat.id) == 200
    assert len({m.content for m in a.messages(chat.id)}) == 200


def test_a_newer_schema_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "chats.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="upgrade diptych"):
        Store(path)
