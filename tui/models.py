"""Finding GGUF files to offer in the model picker.

Sources: the embedded default model, the folders listed in the settings file, and the
Hugging Face cache (`huggingface_hub.scan_cache_dir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from diptych.sources.default_model import FILENAME as DEFAULT_FILENAME

from .paths import settings_path


@dataclass(frozen=True)
class ModelChoice:
    label: str
    path: Path | None  # None: the embedded default, fetched on first use
    source: str        # "default" | "folder" | "hf cache"


def read_settings() -> tuple[dict, str | None]:
    """The settings file as a dict ({} when there is none), and what is wrong with it: it
    is not valid JSON, not an object, or `model_folders` is not a list of strings."""
    path = settings_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        return {}, f"{path} cannot be read ({exc}); it is ignored"
    if not isinstance(data, dict):
        return {}, f"{path} holds a JSON {type(data).__name__}, not an object; it is ignored"
    folders = data.get("model_folders", [])
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        return {}, f"{path}: model_folders must be a list of folder names; it is ignored"
    return data, None


def configured_folders() -> list[Path]:
    return [Path(f).expanduser() for f in read_settings()[0].get("model_folders", [])]


def add_configured_folder(folder: Path) -> bool:
    """Remember `folder` in the settings file; False (and the file left as it is) when the
    file holds something else than settings or cannot be written."""
    data, problem = read_settings()
    if problem:
        return False
    folders = data.setdefault("model_folders", [])
    if str(folder) not in folders:
        folders.append(str(folder))
    try:
        settings_path().parent.mkdir(parents=True, exist_ok=True)
        settings_path().write_text(json.dumps(data, indent=2) + "\n")
    except OSError:
        return False
    return True


def in_folders(folders: list[Path]) -> list[ModelChoice]:
    found = []
    for folder in folders:
        if folder.is_dir():
            for f in sorted(folder.rglob("*.gguf")):
                found.append(ModelChoice(f"{f.name}  ({f.parent})", f, "folder"))
    return found


def in_hf_cache() -> list[ModelChoice]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # read HF_HUB_CACHE now: huggingface_hub reads it once, when first imported
        info = scan_cache_dir(os.environ.get("HF_HUB_CACHE"))
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            for f in sorted(rev.files, key=lambda f: f.file_name):
                if f.file_name.endswith(".gguf"):
                    found.append(ModelChoice(f"{repo.repo_id}/{f.file_name}  (Hugging Face cache)",
                                             f.file_path, "hf cache"))
    return found


def discover() -> list[ModelChoice]:
    """Every model the picker offers, the default first, each file once."""
    choices = [ModelChoice(f"{DEFAULT_FILENAME}  (embedded default)", None, "default")]
    seen = set()
    for choice in in_folders(configured_folders()) + in_hf_cache():
        key = choice.path.resolve()
        if key not in seen:
            seen.add(key)
            choices.append(choice)
    return choices
