"""Finding LoRA adapters to offer beside the model: the fine-tuning runs' folders under the
data folder (`adapters/`), each holding a PEFT adapter and `adapter.gguf`."""

from __future__ import annotations

from pathlib import Path

from .paths import data_dir

# the files that make a folder an adapter (a PEFT folder, or a fine-tuning run's)
MARKERS = ("adapter_config.json", "adapter.gguf")


def adapters_dir() -> Path:
    """Where the fine-tune screen writes its runs."""
    return data_dir() / "adapters"


def is_adapter(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def discover_adapters() -> list[Path]:
    """The adapter folders under `adapters_dir()`, newest first."""
    root = adapters_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_adapter(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
