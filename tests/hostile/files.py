"""Hostile model files: tiny valid models, and copies of them with one thing broken.

`base_models(folder)` converts tiny random transformers models of four families (dense
llama, gemma3 with sliding windows, qwen3moe, deepseek_v2 with MLA and a leading dense layer)
to GGUF with diptych's converter, and saves a qwen2 Hugging Face folder with a byte-level BPE
tokenizer. `variant` rewrites a GGUF with diptych's writer, metadata values replaced or
removed and tensors changed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from diptych.quant.gguf_file import GGUFFile
from diptych.quant.gguf_write import write_gguf
from diptych.quant.tensor import QuantTensor

GGUF_FAMILIES = {"llama": "llama", "gemma3": "gemma3", "qwen3moe": "qwen3moe",
                 "deepseek_v2": "deepseek2"}  # tiny_models family -> GGUF architecture
DROP = object()  # as a value in `variant(set=...)`: remove the key


def base_models(folder: Path) -> dict[str, Path]:
    """family -> GGUF path, and "hf" -> a Hugging Face folder."""
    from tests.tiny_models import save_hf_folder, tiny_hf_model
    from tests.tiny_models import write_gguf as convert

    folder.mkdir(parents=True, exist_ok=True)
    out = {fam: convert(tiny_hf_model(fam), fam, folder / f"{fam}.gguf")
           for fam in GGUF_FAMILIES}
    out["hf"] = save_hf_folder(tiny_hf_model("qwen2", vocab_size=320), folder / "hf",
                               tokenizer="bpe")
    return out


def variant(base: Path, path: Path, set: Mapping[str, Any] | None = None,
            tensors: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> Path:
    """`base` rewritten to `path` with metadata `set` (DROP removes a key) and each tensor
    named in `tensors` replaced by fn(float32 values), stored as F32."""
    with GGUFFile(base) as f:
        metadata = {k: f.metadata[k] for k in f.metadata if not k.startswith("GGUF.")}
        for key, value in (set or {}).items():
            if value is DROP:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        table = dict(f.tensors)
        for name, change in (tensors or {}).items():
            values = np.ascontiguousarray(change(table[name].dequantize()), dtype=np.float32)
            table[name] = QuantTensor(name, T.F32, values.shape,
                                      values.reshape(-1, values.shape[-1]).view(np.uint8))
        metadata.pop("general.file_type", None)
        metadata.pop("general.quantization_version", None)
        return write_gguf(path, metadata, table)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def nan_at(index: int) -> Callable[[np.ndarray], np.ndarray]:
    def change(values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values.reshape(-1)[index] = np.nan
        return values
    return change
