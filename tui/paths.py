"""Where the chat app keeps its data: the SQLite database and the settings file."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """$DIPTYCH_DATA_DIR, else $XDG_DATA_HOME/diptych, else ~/.local/share/diptych (created
    when the chat store opens)."""
    if env := os.environ.get("DIPTYCH_DATA_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "diptych"


def database_path() -> Path:
    return data_dir() / "chats.sqlite3"


def settings_path() -> Path:
    """A JSON file the user may edit: {"model_folders": ["~/models", ...]}."""
    return data_dir() / "settings.json"
