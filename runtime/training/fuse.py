"""`diptych fuse`: a model with a LoRA adapter merged into its weights, written as GGUF.

Each matrix an adapter pair targets is dequantized, becomes W + scale * B @ A (B's rows put
into the file's row order: llama's Q/K permutation), and is written in the output type: the
input's own type per tensor by default, F32/F16/BF16 for the whole file, or a quantization
mix (Q8_0, Q4_K_M, ...; per-tensor types by llama.cpp's rules, quant/mixes.py). Writing a
merged matrix in a quantized type rounds it again, so the fuse measures what that cost: the
relative RMS error of every tensor written in a type that changed its values, read back
from the written file. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from diptych.errors import InvalidArgumentError
from diptych.model.adapter_files import LoraAdapter, gguf_placement, read_adapter
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.gguf_write import FILE_TYPES, target_type, write_gguf
from diptych.quant.tensor import QuantTensor
from diptych.sources.hf_folder import open_source
from diptych.sources.hub import local_path
from diptych.sources.quantize import QUANTIZE_MIXES, mix_types_for
from diptych.quant.mixes import mix_default

FLOAT_TYPES = ("F32", "F16", "BF16")
FUSE_TYPES = FLOAT_TYPES + QUANTIZE_MIXES


@dataclass
class FuseResult:
    """The written file and, per tensor written in a type that rounds (or re-rounds) its
    values, the relative RMS error of what was written against the exact merged values."""

    path: Path
    fused: list[str]
    errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.errors:
            return "no tensor was rounded: the merge is exact"
        worst = max(self.errors, key=self.errors.get)
        return (f"rounding error (relative RMS) over {len(self.errors)} tensors: median "
                f"{statistics.median(self.errors.values()):.2e}, max "
                f"{self.errors[worst]:.2e} ({worst})")


class _Merged(Mapping):
    """The source's tensors, those an adapter targets merged (as F32) when read."""

    def __init__(self, tensors: Mapping[str, QuantTensor], deltas: dict):
        self.tensors, self.deltas = tensors, deltas

    def __getitem__(self, name: str) -> QuantTensor:
        t = self.tensors[name]
        if name not in self.deltas:
            return t
        values = merged_values(t, self.deltas[name])
        return QuantTensor(name, T.F32, t.shape, values.view(np.uint8).reshape(t.n_rows, -1))

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def merged_values(t: QuantTensor, delta: list) -> np.ndarray:
    """W + sum of scale * B @ A over the pairs (A, B in the file's row order, scale)."""
    w = t.dequantize().astype(np.float32)
    for a, b, scale in delta:
        w += np.float32(scale) * (b @ a)
    return w


def _deltas(adapter: LoraAdapter, cfg, tensors: Mapping[str, QuantTensor], scale: float) -> dict:
    """tensor name -> [(A, B in file row order, scale)], checked against the tensors."""
    out: dict[str, list] = {}
    for (i, module), (a, b) in sorted(adapter.pairs.items()):
        name, order = gguf_placement(cfg, i, module, b.shape[0])
        t = tensors.get(name)
        if t is None:
            raise InvalidArgumentError(f"the adapter has {module} in layer {i}, which this "
                                       f"model lacks ({name})")
        if len(t.shape) != 2 or t.shape != (b.shape[0], a.shape[1]):
            raise InvalidArgumentError(
                f"layer {i} {module}: the adapter's pair is {b.shape[0]}x{a.shape[1]}, the "
                f"model's {name} is {'x'.join(map(str, t.shape))}: an adapter for another "
                f"model?")
        out.setdefault(name, []).append((a, b if order is None else b[order],
                                         adapter.scale * scale))
    return out


def fuse(model: str | Path, adapter: str | Path, out: str | Path, type: str | None = None, *,
         scale: float = 1.0,
         progress: Callable[[str, int, int], None] | None = None) -> FuseResult:
    """Write the model at `model` (a path or a Hub name) with `adapter` (a PEFT folder, a GGUF
    LoRA file or a finetune run's folder) merged in, scaled by `scale`, to `out`.

    `type`: None keeps each tensor's type; F32, F16 or BF16 writes every matrix in it; a mix
    name (FUSE_TYPES) chooses per-tensor types as `diptych quantize` does. A merged matrix
    written quantized is rounded again (lossy): the result's `errors` and `summary()` say
    how much. `progress(tensor_name, done_bytes, total_bytes)` is called after each tensor.
    """
    from diptych.load_plan import read_config

    if type is not None and type.upper() not in FUSE_TYPES:
        raise InvalidArgumentError(f"unknown output type {type!r} (known: "
                                   f"{', '.join(FUSE_TYPES)})")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidArgumentError(f"scale must be a number, got {scale!r}")
    src, out = local_path(model), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise InvalidArgumentError(f"{out}: the output would overwrite the input")
    if out.is_dir():
        raise InvalidArgumentError(f"{out}: is a folder; name the .gguf file to write")
    source = open_source(src)
    cfg = read_config(source)
    tensors = source.tensors
    deltas = _deltas(read_adapter(adapter, cfg), cfg, tensors, scale)
    types, file_type = _types(source, type)
    total = sum(t.nbytes for t in tensors.values())
    done, names = 0, iter(types)

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(next(names), done, total)

    write_gguf(out, dict(source.metadata.items()), _Merged(tensors, deltas), None, step,
               types=types, file_type=file_type)
    return FuseResult(out, sorted(deltas), _errors(out, tensors, deltas, types))


def _types(source, type: str | None):
    """(name -> output type, general.file_type or None to keep the input's)."""
    tensors = source.tensors
    if type is None:
        return {name: t.ggml_type for name, t in tensors.items()}, None
    type = type.upper()
    if type in FLOAT_TYPES:
        want = T[type]
        return {name: target_type(t, want) for name, t in tensors.items()}, FILE_TYPES[want]
    return mix_types_for(source.metadata, tensors, type), mix_default(type)[0]


def _errors(path: Path, tensors, deltas, types) -> dict[str, float]:
    """Relative RMS error of each written tensor whose values the output type rounded:
    merged ones not written as F32, and unmerged ones whose type changed."""
    errors = {}
    with GGUFFile(path) as written:
        for name, t in tensors.items():
            to = types[name]
            if to == T.F32 or (name not in deltas and to == t.ggml_type):
                continue
            want = merged_values(t, deltas[name]) if name in deltas else t.dequantize()
            got = written.tensors[name].dequantize()
            norm = float(np.sqrt(np.mean(np.square(want, dtype=np.float64))))
            err = float(np.sqrt(np.mean(np.square(got - want, dtype=np.float64))))
            errors[name] = err / norm if norm else err
    return errors
