"""Broken chat stores: the real app starts on each (Textual Pilot), says what is wrong and
what it did, and deletes nothing. And a reply in progress survives a kill."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diptych.errors import DiptychError
from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.models import add_configured_folder, configured_folders
from diptych.tui.store import SCHEMA_VERSION, Store, StoreError
from diptych.tui.widgets.sidebar import ChatList


@pytest.fixture
def data(tmp_path, monkeypatch):
    path = tmp_path / "data"
    monkeypatch.setenv("DIPTYCH_DATA_DIR", str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return path


def make_chats(folder: Path, n: int = 3) -> Path:
    """A real database with `n` chats of a few messages, closed cleanly."""
    store = Store(folder / "chats.sqlite3")
    for i in range(n):
        chat = store.new_chat(f"chat {i}", ChatSettings(temperature=0.1 * i))
        for k in range(20):
            store.add_message(chat.id, "user" if k % 2 == 0 else "assistant", f"{i}.{k} " * 40)
    store.close()
    return folder / "chats.sqlite3"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def start_app():
    """Start the real app on the current data folder; returns its notices and chat titles."""
    async def run():
        app = DiptychApp(autoload=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            chats = app.chat.query_one(ChatList)
            titles = list(chats.titles)
            notices = [n.message for n in app._notifications]
            await pilot.press("ctrl+t")   # a write (the theme preference) must not fail
        return notices, titles

    return asyncio.run(run())


def test_store_error_is_a_diptych_error():
    assert issubclass(StoreError, DiptychError)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header only"])
def test_a_damaged_database_is_kept_aside_and_a_new_one_started(data, damage):
    path = make_chats(data)
    whole = path.read_bytes()
    broken = {"garbage": os.urandom(len(whole)), "truncated": whole[:len(whole) // 2],
              "header only": whole[:100]}[damage]
    path.write_bytes(broken)
    notices, titles = start_app()
    (notice,) = notices
    assert "is damaged" in notice and "a new chat database was started" in notice
    (kept,) = [p for p in data.glob("chats.sqlite3.damaged-*")
               if not p.name.endswith(("-wal", "-shm"))]
    assert kept.name in notice and kept.read_bytes() == broken   # nothing deleted
    assert titles == []
    assert start_app() == ([], [])   # the new database is sound


def test_a_database_from_a_newer_version_is_left_alone(data):
    path = make_chats(data)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = digest(data)
    notices, titles = start_app()
    assert len(notices) == 1 and "upgrade diptych" in notices[0]
    assert "not be saved" in notices[0] and titles == []
    assert digest(data) == before


def test_a_data_folder_that_is_a_file(data):
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("not a folder")
    notices, titles = start_app()
    assert len(notices) == 1 and "cannot be used" in notices[0] and str(data) in notices[0]
    assert titles == [] and data.read_text() == "not a folder"


def test_settings_cells_of_the_wrong_shape_are_ignored_with_a_notice(data):
    path = make_chats(data)
    db = sqlite3.connect(path)
    db.execute("UPDATE chats SET settings='[1, 2]' WHERE title='chat 0'")
    db.execute("""UPDATE chats SET settings='{"temperature": "hot", "top_k": 5}'
                  WHERE title='chat 1'""")
    db.execute("UPDATE chats SET settings='{not json' WHERE title='chat 2'")
    db.commit()
    db.close()
    notices, titles = start_app()
    assert sorted(titles) == ["chat 0", "chat 1", "chat 2"]
    (notice,) = notices
    assert "“chat 0”: a JSON list" in notice and "“chat 1”: temperature='hot'" in notice
    assert "“chat 2”: not valid JSON" in notice
    chats = {c.title: c for c in Store(path).chats()}
    assert chats["chat 1"].settings.top_k == 5   # the readable values are kept
    assert chats["chat 1"].settings.temperature == ChatSettings().temperature


@pytest.mark.parametrize("stored", ['"no-such-theme"', "{broken", "5"])
def test_a_bad_theme_preference_is_ignored(data, stored):
    path = make_chats(data, 1)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO preferences(key, value) VALUES ('theme', ?)", (stored,))
    db.commit()
    db.close()
    notices, titles = start_app()
    assert titles == ["chat 0"]
    assert all("theme" in n for n in notices)


@pytest.mark.parametrize("content", ["[1, 2]", '{"model_folders": "~/models"}',
                                     '{"model_folders": [3]}', "{oops"])
def test_a_settings_file_of_the_wrong_shape_is_ignored_and_kept(data, content):
    data.mkdir(parents=True)
    (data / "settings.json").write_text(content)
    notices, _ = start_app()
    assert len(notices) == 1 and "settings.json" in notices[0] and "ignored" in notices[0]
    assert configured_folders() == []
    assert add_configured_folder(data) is False
    assert (data / "settings.json").read_text() == content


ROOT = Path(__file__).resolve().parents[2]
READ_ONLY_RUN = "import json; from tests.hostile.test_store import start_app; " \
                "print(json.dumps(start_app()))"


def run_read_only(folder: Path) -> tuple[list[str], list[str]]:
    """Run the app with `folder` mounted read-only: a user and mount namespace make that
    possible without privileges, and it holds for root too (which ignores file modes)."""
    mount = (f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder}")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && ! touch {folder}/x"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a read-only folder here (no user namespaces)")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"{mount} && exec {sys.executable} -c '{READ_ONLY_RUN}'"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "DIPTYCH_DATA_DIR": str(folder)})
    assert proc.returncode == 0, proc.stderr
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_a_read_only_folder_with_a_database_shows_the_chats(data, tmp_path):
    make_chats(tmp_path / "live")
    # what a killed app leaves: a database whose last chat is only in its write-ahead log
    store = Store(tmp_path / "live" / "chats.sqlite3")
    store.db.execute("PRAGMA wal_autocheckpoint=0")
    store.new_chat("only in the log", ChatSettings())
    data.mkdir(parents=True)
    for name in ("chats.sqlite3", "chats.sqlite3-wal"):   # no -shm: WAL would need to make it
        (data / name).write_bytes((tmp_path / "live" / name).read_bytes())
    store.close()
    before = digest(data)
    notices, titles = run_read_only(data)
    assert sorted(titles) == ["chat 0", "chat 1", "chat 2", "only in the log"]
    assert len(notices) == 1 and "cannot be written" in notices[0]
    assert "nothing of this session will be saved" in notices[0]
    assert digest(data) == before


def test_a_read_only_empty_folder(data):
    data.mkdir(parents=True)
    notices, titles = run_read_only(data)
    assert titles == [] and len(notices) == 1 and "not be saved" in notices[0]
    assert list(data.iterdir()) == []


KILLED_RUN = """
import asyncio, json, sys, time
import diptych
from diptych.tui.app import DiptychApp
from diptych.tui.chat_settings import ChatSettings

async def run():
    model = diptych.load(sys.argv[1], backend="torch", n_ctx=1024)
    app = DiptychApp(model=model, settings=ChatSettings(temperature=0, max_tokens=400))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press(*"Tell me a long story about a brave dragon.", "enter")
        while True:
            view = app.chat.reply_view
            print(json.dumps([time.monotonic(), None if view is None else view.content]),
                  flush=True)
            await pilot.pause(0.05)

asyncio.run(run())
"""


@pytest.mark.real
def test_a_kill_mid_reply_loses_at_most_the_last_half_second(data, tmp_path, smollm2_path):
    """The app is killed (SIGKILL) while a reply streams: the database holds what the
    transcript showed up to SAVE_EVERY_S before the kill (plus scheduling slack)."""
    from diptych.tui.screens.chat import SAVE_EVERY_S

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(smollm2_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = []   # (monotonic time, the reply's text on screen), from its first text on
    try:
        for line in proc.stdout:
            t, text = json.loads(line)
            if text is None and shown:
                break   # the reply ended before the kill: the check below fails
            if text:
                shown.append((t, text))
            # stream for a few save periods, however fast this machine decodes
            if shown and shown[-1][0] - shown[0][0] >= 4 * SAVE_EVERY_S:
                break
        killed_at = time.monotonic()
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert shown and shown[-1][0] - shown[0][0] >= 4 * SAVE_EVERY_S, proc.stderr.read()
    rows = sqlite3.connect(data / "chats.sqlite3").execute(
        "SELECT role, content FROM messages ORDER BY id").fetchall()
    assert [role for role, _ in rows] == ["user", "assistant"]
    saved = rows[1][1]
    assert shown[-1][1].startswith(saved)
    must_have = [text for t, text in shown if t <= killed_at - 2 * SAVE_EVERY_S]
    assert must_have and len(saved) >= len(must_have[-1]) > 0
