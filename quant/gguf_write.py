"""Write a GGUF file with gguf-py's GGUFWriter, streaming one tensor at a time.

Metadata values are typed as llama.cpp's converter types them: int -> u32 (i32 if negative),
float -> f32, bool, str, list[str], numpy arrays by dtype (token types i32, scores f32, per-layer
flags bool). Tensors are written as they are, converted to one GGML type (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) keeping llama.cpp's converter's exceptions (vectors,
norms, biases and MoE routers stay F32, a matrix whose rows do not divide into the type's
blocks falls back to F16), or each to the type a mapping names (a quantization mix,
quant/mixes.py); conversion goes through quant/quantize.py.

Tensors are quantized and written one after another, so memory holds one converted tensor
at a time, never the whole converted model. The file is written under a temporary name in
the destination folder and renamed when complete: an error, Ctrl+C or a full disk leaves
no partial file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType, LlamaFileType
from gguf import GGMLQuantizationType as T

from diptych.errors import ModelFileError

from .formats import FORMATS, row_bytes
from .quantize import quantize_rows
from .tensor import QuantTensor

__all__ = ["WRITE_TYPES", "FILE_TYPES", "write_gguf", "target_type", "keeps_f32"]

# GGML type -> general.file_type for a file converted to it
FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1,
}
WRITE_TYPES = tuple(FILE_TYPES)

_ARRAY_TYPES = {np.dtype(t): v for t, v in (
    (np.int32, GGUFValueType.INT32), (np.uint32, GGUFValueType.UINT32),
    (np.float32, GGUFValueType.FLOAT32), (np.bool_, GGUFValueType.BOOL),
    (np.int64, GGUFValueType.INT64), (np.float64, GGUFValueType.FLOAT64))}


def _add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)):
        w.add_bool(key, bool(value))
    elif isinstance(value, (int, np.integer)):
        (w.add_int32 if value < 0 else w.add_uint32)(key, int(value))
    elif isinstance(value, (float, np.floating)):
        w.add_float32(key, float(value))
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, np.ndarray):
        w.add_key_value(key, value.tolist(), GGUFValueType.ARRAY,
                        sub_type=_ARRAY_TYPES[value.dtype])
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    else:
        raise TypeError(f"metadata {key!r}: cannot write a {type(value).__name__}")


def keeps_f32(name: str, n_dims: int) -> bool:
    """llama.cpp stores these as F32 whatever the file's type: vectors, norms, biases,
    MoE routers."""
    return (n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or ".ffn_gate_inp." in name)


def target_type(t: QuantTensor, want: T | None) -> T:
    """The type `t` is written as when the file's type is `want` (None: as it is)."""
    if want is None:
        return t.ggml_type
    if keeps_f32(t.name, len(t.shape)):
        return T.F32
    if t.shape[-1] % FORMATS[want].block_size:
        return T.F16
    return want


def _converted(t: QuantTensor, to: T, importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes of `t` in type `to`, one row of blocks per row. `importance`: per-column
    weights (n_cols,), or one row of them per matrix of a 3-D tensor (routed experts)."""
    if to == t.ggml_type:
        return t.data
    values = t.dequantize()
    if importance is not None and np.ndim(importance) == 2:
        return np.concatenate([quantize_rows(values[e], to, qw)
                               for e, qw in enumerate(importance)])
    return quantize_rows(values.reshape(-1, t.shape[-1]), to, importance)


def _nbytes(shape: tuple[int, ...], to: T) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(to, shape[-1])


def write_gguf(path: str | Path, metadata: Mapping[str, Any], tensors: Mapping[str, QuantTensor],
               ggml_type: T | None = None,
               progress: Callable[[int], None] | None = None, *,
               types: Mapping[str, T] | None = None,
               file_type: LlamaFileType | None = None,
               importance: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write `metadata` (which names general.architecture) and `tensors` to `path`.

    `ggml_type`: convert the matrices to this type (see `target_type`); None keeps every
    tensor's type. `types`: name -> type for each tensor instead (a mix), recorded as
    `file_type`. `progress(n)` is called with each tensor's source size in bytes.
    `importance`: name -> per-column importance (an imatrix) for the quantizers that use it
    ((n_expert, n_cols) for stacked routed experts).
    A failed write (disk full, interrupted) raises and leaves no file at `path`.
    """
    return write_atomically(path, lambda tmp: _write(
        tmp, metadata, tensors, ggml_type, progress, types, file_type, importance or {}))


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a file under a temporary name beside `path`, renamed to `path` when
    complete; a failure (disk full, interrupted) leaves no file at `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write(path, metadata, tensors, ggml_type, progress, types, file_type, importance) -> None:
    w = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    if ggml_type is not None:
        file_type = FILE_TYPES[ggml_type]
    skip = {"general.architecture"} | ({"general.file_type"} if file_type is not None else set())
    for key, value in metadata.items():
        if key not in skip:
            _add_value(w, key, value)
    if file_type is not None:
        w.add_uint32("general.file_type", file_type.value)
    if "general.quantization_version" not in metadata:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    chosen = {}
    for name, t in tensors.items():  # a Mapping may build each tensor when read: keep none
        chosen[name] = to = types[name] if types is not None else target_type(t, ggml_type)
        # an uint8 "tensor" makes GGUFWriter read the shape as bytes of type `to`
        row_bytes = _nbytes((t.shape[-1],), to)
        w.add_tensor_info(name, (*t.shape[:-1], row_bytes), np.dtype(np.uint8),
                          _nbytes(t.shape, to), raw_dtype=to)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, to in chosen.items():
            t = tensors[name]
            w.write_tensor_data(_converted(t, to, importance.get(name)))
            if progress:
                progress(t.nbytes)
    finally:
        w.close()
