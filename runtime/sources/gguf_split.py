"""A GGUF model split into several files, as llama.cpp's `gguf-split` and gguf-py's writer
write them: `NAME-00001-of-00003.gguf`, ... The first part holds the metadata; every part
holds `split.no`, `split.count` and a share of the tensors (`split.tensors.count` is the
total). Read as one source: the first part's metadata and every part's tensors, each part
memory-mapped on its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from diptych.errors import ModelFileError
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.tensor import QuantTensor

_PART = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part(name: str) -> tuple[str, int, int] | None:
    """'m-00002-of-00003.gguf' -> ('m', 2, 3); None for a file name that is not a part."""
    m = _PART.match(name)
    return (m["stem"], int(m["no"]), int(m["count"])) if m else None


def part_names(stem: str, count: int) -> list[str]:
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


class SplitGGUF:
    """The parts of a split GGUF model, opened from its first part: `.path`, `.metadata`
    (the first part's) and `.tensors` (every part's), like a `GGUFFile`."""

    def __init__(self, first: str | Path):
        self.path = first = Path(first)
        stem, no, count = split_part(first.name) or (None, 0, 0)
        if no != 1:
            raise ModelFileError(f"{first}: not the first part of a split GGUF model "
                                 "(its name must end in -00001-of-NNNNN.gguf)")
        paths = [first.with_name(n) for n in part_names(stem, count)]
        if missing := [p.name for p in paths if not p.is_file()]:
            raise ModelFileError(f"{first}: the split model lacks its parts {missing}")
        self.parts = [GGUFFile(p) for p in paths]
        self.metadata = self.parts[0].metadata
        self.tensors: dict[str, QuantTensor] = {}
        for i, part in enumerate(self.parts, 1):
            if (part.metadata.get("split.no"), part.metadata.get("split.count")) != (i - 1, count):
                raise ModelFileError(f"{part.path}: its split.no/split.count do not say part "
                                     f"{i} of {count}")
            for name, t in part.tensors.items():
                if name in self.tensors:
                    raise ModelFileError(f"{part.path}: tensor {name} is in two parts")
                self.tensors[name] = t
        total = self.metadata.get("split.tensors.count")
        if total != len(self.tensors):
            raise ModelFileError(f"{first}: split.tensors.count is {total} but the parts hold "
                                 f"{len(self.tensors)} tensors")

    def close(self) -> None:
        for part in self.parts:
            part.close()
