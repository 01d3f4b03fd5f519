"""Markdown export, code-block extraction, and finding GGUF files for the model picker."""

import json
import os

from diptych.sources.default_model import FILENAME as DEFAULT_FILENAME
from diptych.tui.chat_settings import ChatSettings
from diptych.tui.export import chat_to_markdown, code_blocks, export_filename
from diptych.tui.models import add_configured_folder, discover
from diptych.tui.store import Store

REPLY = "Here:\n\n```python\nprint('hi')\n```\n\nand\n\n```sh\nls -l\n```\n"


def test_export_to_markdown(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat("Shell: list files?", ChatSettings(system="Be brief."), "m.gguf")
    store.add_message(chat.id, "user", "How do I list files?")
    store.add_message(chat.id, "assistant", REPLY)
    text = chat_to_markdown(chat, store.messages(chat.id))
    assert text.startswith("# Shell: list files?\n")
    for part in ("Model: `m.gguf`", "## System\n\nBe brief.", "## User\n\nHow do I list files?",
                 "## Assistant\n\nHere:", "```sh\nls -l\n```"):
        assert part in text
    assert export_filename(chat) == f"shell-list-files-{chat.id}.md"


def test_code_blocks():
    assert code_blocks(REPLY) == ["print('hi')\n", "ls -l\n"]
    assert code_blocks("no code here") == []


def fake_hf_cache(root, repo, filename):
    """The layout huggingface_hub writes: blobs, a snapshot symlink, and a ref."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "blobs" / "abc123").write_bytes(b"GGUF")
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    os.symlink(base / "blobs" / "abc123", snap / filename)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)


def test_discover_default_downloads_folders_and_hf_cache(tmp_path, data_dir, no_downloads):
    downloads = tmp_path / "cache" / "models"
    downloads.mkdir(parents=True)
    for name in (DEFAULT_FILENAME, "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m.gguf.sha256"):
        (downloads / name).write_bytes(b"GGUF")
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "tiny.gguf").write_bytes(b"GGUF")
    (folder / "notes.txt").write_text("not a model")
    add_configured_folder(folder)
    add_configured_folder(folder)  # once only
    assert json.loads((data_dir / "settings.json").read_text()) == {"model_folders": [str(folder)]}
    fake_hf_cache(tmp_path / "hf-cache", "org/some-GGUF", "some.Q4_0.gguf")

    choices = discover()
    # the default model's downloaded file is its own entry, listed once
    assert [c.source for c in choices] == ["default", "downloaded", "folder", "hf cache"]
    assert choices[0].path is None and "embedded default" in choices[0].label
    assert choices[1].path == downloads / "gemma-3-270m-q4_k_m.gguf"
    assert choices[1].label == "gemma-3-270m-q4_k_m.gguf  (downloaded)"
    assert choices[2].path == folder / "sub" / "tiny.gguf"
    assert choices[3].label == "org/some-GGUF/some.Q4_0.gguf  (Hugging Face cache)"
