"""`diptych quantize`: a model (F32/F16/BF16 GGUF, Hugging Face folder, or with
`allow_requantize` a quantized GGUF) written as GGUF in a quantization mix (Q4_K_M, ...).

Per-tensor types follow llama.cpp's rules for the mix (diptych.quant.mixes); the values go
through diptych.quant.quantize (weighted by an importance matrix where one is given:
diptych.inference.imatrix); the file is written under a temporary name and renamed when
complete (diptych.quant.gguf_write).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from gguf import GGMLQuantizationType as T

from diptych.errors import InvalidArgumentError, ModelFileError
from diptych.quant.gguf_write import write_gguf
from diptych.inference.imatrix import Imatrix
from diptych.quant.mixes import MIXES, ModelShape, mix_default, tensor_types
from diptych.quant.quantize import IMATRIX_TYPES

from .hf_folder import open_source
from .hub import local_path

__all__ = ["QUANTIZE_MIXES", "quantize", "mix_types_for"]

QUANTIZE_MIXES = tuple(MIXES)
_FLOATS = (T.F32, T.F16, T.BF16)
_NOT_RECORDED = ("token_embd.weight", "output.weight")


def mix_types_for(metadata, tensors, mix: str) -> dict[str, T]:
    """name -> type of every tensor of a model in `mix`."""
    return tensor_types(mix, ModelShape.from_metadata(metadata),
                        ((name, t.shape, t.ggml_type) for name, t in tensors.items()))


def quantize(src: str | Path, out: str | Path, type: str = "Q4_K_M", *,
             allow_requantize: bool = False, imatrix: str | Path | Imatrix | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write the model at `src` (a path, or a Hub name `org/repo[:QUANT]`) to `out` as GGUF
    in the mix `type` (QUANTIZE_MIXES).

    A source whose matrices are already quantized is refused unless `allow_requantize`
    (then a warning: quantizing dequantized values compounds both roundings).
    `imatrix`: an importance matrix (a file `diptych imatrix` or llama-imatrix wrote, or an
    Imatrix) whose column weights the K-quant quantizers that take one use (IMATRIX_TYPES).
    `progress(tensor_name, done_bytes, total_bytes)` is called after each tensor.
    """
    file_type, _ = mix_default(type)
    src, out = local_path(src), Path(out)
    if out.resolve() == src.resolve():
        raise InvalidArgumentError(f"{out}: the output would overwrite the input")
    if out.is_dir():
        raise InvalidArgumentError(f"{out}: is a folder; name the .gguf file to write")
    source = open_source(src)
    tensors = source.tensors
    types = mix_types_for(source.metadata, tensors, type)
    quantized = sorted({t.ggml_type.name for name, t in tensors.items()
                        if t.ggml_type not in _FLOATS and types[name] != t.ggml_type})
    if quantized and not allow_requantize:
        raise ModelFileError(
            f"{src}: already quantized ({', '.join(quantized)}); quantize from an F32/F16/BF16 "
            "file or a Hugging Face folder, or pass --allow-requantize (lossy)")
    if quantized:
        warnings.warn(f"requantizing {', '.join(quantized)} tensors to {type.upper()}: the "
                      "result carries the error of both quantizations", stacklevel=2)
    total = sum(t.nbytes for t in tensors.values())
    done = 0
    names = iter(types)

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(next(names), done, total)

    importance = _importance(imatrix, tensors, types) if imatrix is not None else None
    return write_gguf(out, dict(source.metadata.items()), tensors, None, step,
                      types=types, file_type=file_type, importance=importance)


def _importance(imatrix, tensors, types) -> dict:
    """name -> column importance of each matrix the imatrix covers and a quantizer weighs;
    a warning for those it leaves out, an error for an imatrix of another model."""
    im = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
    wanted = [n for n, t in types.items() if t in IMATRIX_TYPES and len(tensors[n].shape) >= 2]
    out = {}
    for name in wanted:
        values = im.importance(name)
        if values is None:
            continue
        shape = tensors[name].shape
        # one row per matrix: routed experts (n_expert, out, in) have one per expert
        want = (shape[0] if len(shape) == 3 else 1, shape[-1])
        if values.shape != want:
            raise ModelFileError(f"the imatrix holds {values.shape} values for {name}, whose "
                                 f"matrices want {want}: it is another model's")
        out[name] = values if len(shape) == 3 else values[0]
    if wanted and not out:
        raise ModelFileError("the imatrix covers none of this model's matrices: it is another "
                             "model's")
    # llama-imatrix records neither the embedding (a row lookup) nor, by default, the output
    if missed := [n for n in wanted if n not in out and n not in _NOT_RECORDED]:
        warnings.warn(f"the imatrix has no entry for {len(missed)} of {len(wanted)} matrices "
                      f"({missed[0]}, ...): quantized without it", stacklevel=3)
    return out
