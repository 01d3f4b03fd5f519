"""A model's name as a user recognises it: the file (or folder) name with its quant type."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from gguf import LlamaFileType


def quant_type(gguf) -> str:
    """'Q4_K_M' from `general.file_type`, else the tensor type holding most bytes."""
    file_type = gguf.metadata.get("general.file_type")
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        size = Counter()
        for t in gguf.tensors.values():
            size[t.type_name] += t.nbytes
        return size.most_common(1)[0][0] if size else "?"


def display_name(path: Path, gguf) -> str:
    """'SmolLM2-135M-Instruct.Q4_1' for that file; 'Qwen3-0.6B BF16' for a folder."""
    stem = path.stem if path.is_file() else path.name
    quant = quant_type(gguf)

    def squash(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    return stem if squash(quant) in squash(stem) else f"{stem} {quant}"
