"""`diptych convert`: a Hugging Face safetensors folder to a GGUF file llama.cpp loads.

The folder is read by `HFSource` (the tensors and metadata llama.cpp's converter would
write) and written by `diptych.quant.gguf_write`, converting the matrices to one type as
llama.cpp's converter does, or to a K-quant mix (Q4_K_M, ...) with per-tensor types as
llama.cpp's quantizer chooses them (`diptych quantize`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gguf import GGMLQuantizationType

from diptych.errors import InvalidArgumentError
from diptych.quant.gguf_write import WRITE_TYPES, write_gguf
from diptych.quant.mixes import MIXES

from .hf_folder import HFSource
from .hub import local_path
from .quantize import mix_types_for

__all__ = ["CONVERT_TYPES", "convert"]

_ONE_TYPE = tuple(t.name for t in WRITE_TYPES)
CONVERT_TYPES = _ONE_TYPE + tuple(m for m in MIXES if m not in _ONE_TYPE)


def convert(folder: str | Path, out: str | Path, type: str = "F16",
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the model in `folder` (or a Hub repository `org/repo`, downloaded) to `out` as
    GGUF, its matrices as `type` (one of CONVERT_TYPES). `progress(done, total)` receives
    bytes of the source tensors."""
    if type.upper() not in CONVERT_TYPES:
        raise InvalidArgumentError(
            f"unknown type {type!r}; choose one of {', '.join(CONVERT_TYPES)}")
    src = HFSource(local_path(folder))
    total = sum(t.nbytes for t in src.tensors.values())
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    type = type.upper()
    if type in _ONE_TYPE:
        return write_gguf(out, src.metadata, src.tensors, GGMLQuantizationType[type], step)
    return write_gguf(out, src.metadata, src.tensors, None, step, file_type=MIXES[type][0],
                      types=mix_types_for(src.metadata, src.tensors, type))
