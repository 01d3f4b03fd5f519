"""Finding GGUF files to offer in the model picker.

Sources: the embedded default model, diptych's own model cache (what `diptych list` shows),
the folders listed in the settings file, and the Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diptych.sources.default_model import FILENAME as DEFAULT_FILENAME
from diptych.sources.model_cache import diptych_files, hub_cache, hub_repos

from .paths import settings_path


@dataclass(frozen=True)
class ModelChoice:
    label: str
    path: Path | None  # None: the embedded default, fetched on first use
    source: str        # "default" | "downloaded" | "folder" | "hf cache"


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


def in_model_cache() -> list[ModelChoice]:
    """diptych's downloads (the default model has its own entry)."""
    return [ModelChoice(f"{f.name}  (downloaded)", f, "downloaded")
            for f in diptych_files() if f.name != DEFAULT_FILENAME]


def in_hf_cache() -> list[ModelChoice]:
    found = []
    for repo in hub_repos(hub_cache()):
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
    for choice in in_model_cache() + in_folders(configured_folders()) + in_hf_cache():
        key = choice.path.resolve()
        if key not in seen:
            seen.add(key)
            choices.append(choice)
    return choices
