"""A Hugging Face safetensors folder, read as the GGUF file llama.cpp's converter would write.

`HFSource(folder)` has `.metadata` (GGUF keys -> values, as `GGUFFile.metadata` gives them)
and `.tensors` (GGUF tensor name -> QuantTensor, F32/F16/BF16), so a folder goes through the
same path as a .gguf file: `config_from_gguf`, `Tokenizer.from_gguf_metadata`, `load_weights`,
and the converter writes exactly these to a file.

The weights get the transforms llama.cpp's `convert_hf_to_gguf.py` applies (they belong to
the weight source, not the family: a GGUF file already holds them): Q/K rows (and biases) permuted for the
`llama` arch, Gemma's norm weights +1, per-expert matrices stacked into one 3-D tensor per
layer (n_expert, rows, cols) (experts saved fused, transformers 5's gate_up_proj and
down_proj, are split into those stacks instead), DeepSeek's kv_b_proj split into attn_k_b (transposed per head)
and attn_v_b. Vectors, norms and MoE routers become F32, as llama.cpp stores them; the other
matrices keep the file's dtype and, where no transform touches them, stay memory-mapped.
Transformed tensors are built when read and not kept (see `_Tensors`). A vision-language
folder (Gemma 3) is read as its text model (`model.families.hf.text_model`).

Safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian
data) rather than with the `safetensors` package: its numpy API has no bfloat16 and reads
tensors into memory, while a numpy memmap view is free and keeps bf16 as raw uint16.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from diptych.quant.gguf_write import keeps_f32
from diptych.quant.tensor import QuantTensor

from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.model.families.hf import (HFFamily, arch_metadata, hf_family,
                                       llama3_rope_factors, text_model)
from diptych.text.hf_vocab import read_json_object, vocab_metadata

__all__ = ["HFSource", "open_source", "read_safetensors"]

# safetensors dtype -> (numpy dtype of the raw elements, GGML type)
_DTYPES = {"F32": (np.float32, T.F32), "F16": (np.float16, T.F16), "BF16": (np.uint16, T.BF16)}


def open_source(path: str | Path):
    """A model source: a .gguf file (GGUFFile), the first part of a split one (SplitGGUF) or
    a Hugging Face folder (HFSource)."""
    from diptych.quant.gguf_file import GGUFFile

    from .gguf_split import SplitGGUF, split_part
    from .hub import not_found

    path = Path(path)
    if not path.exists():
        raise ModelFileError(not_found(path))
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelFileError(f"{path}: is a folder without config.json; diptych loads .gguf "
                             "files and Hugging Face safetensors folders")
    if path.is_dir():
        return HFSource(path)
    return SplitGGUF(path) if split_part(path.name) else GGUFFile(path)


def read_safetensors(path: Path) -> dict[str, tuple[np.ndarray, T]]:
    """name -> (memory-mapped raw elements in their shape, GGML type) for one file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ModelFileError(f"{path}: truncated or not a safetensors file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read the safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file (its header is not a table)")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and _integers(info.get("shape"))
                and _integers(info.get("data_offsets"), length=2)):
            raise ModelFileError(f"{path}: corrupt header entry for tensor {name}")
        dtype, shape = info.get("dtype"), tuple(info["shape"])
        begin, end = (8 + n + o for o in info["data_offsets"])
        if dtype not in _DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16")
        np_dtype, ggml_type = _DTYPES[dtype]
        if min(shape, default=0) < 0 or not 8 + n <= begin <= end:
            raise ModelFileError(f"{path}: corrupt header entry for tensor {name}")
        if end > size:
            raise ModelFileError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        if end - begin != math.prod(shape) * np.dtype(np_dtype).itemsize:  # exact, no overflow
            raise ModelFileError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        out[name] = (mm[begin:end].view(np_dtype).reshape(shape), ggml_type)
    return out


def _integers(value: Any, length: int | None = None) -> bool:
    """A JSON list of integers (of `length` items)."""
    return (isinstance(value, list) and all(type(v) is int for v in value)
            and (length is None or len(value) == length))


def _quant(name: str, arr: np.ndarray, ggml_type: T) -> QuantTensor:
    """Raw elements (f32, f16, or bf16 as uint16) as a QuantTensor (a view when contiguous)."""
    shape = arr.shape if arr.ndim else (1,)
    rows = np.ascontiguousarray(arr).reshape(-1, shape[-1])
    return QuantTensor(name, ggml_type, tuple(int(s) for s in shape), rows.view(np.uint8))


def _as_f32(arr: np.ndarray, ggml_type: T) -> np.ndarray:
    if ggml_type == T.BF16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _permute(arr: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for interleaved RoPE: each head's (2, d/2) rows as (d/2, 2)."""
    rows = arr.shape[0]
    return (arr.reshape(n_head, 2, rows // n_head // 2, *arr.shape[1:])
            .swapaxes(1, 2).reshape(arr.shape))


def _weight_files(folder: Path) -> list[Path]:
    """The shards the index names, else model*.safetensors (Mistral repositories also hold
    a `consolidated.safetensors` with the same weights under other names), else any."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(n, str) for n in weight_map.values()):
            raise ModelFileError(f"{index}: weight_map must map tensor names to file names")
        names = set(weight_map.values())
        for name in names:  # a shard outside the folder is never opened
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise ModelFileError(f"{index}: shard {name!r} lies outside the model folder")
        files = [folder / n for n in sorted(names)]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelFileError(f"{folder}: missing weight shards {missing}")
        return files
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors weights")
    return files


# config.json fields read before the metadata is built (and checked), so checked here
_SIZES = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size")
_MLA_SIZES = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def _check_config(config: dict, family: HFFamily, path: Path) -> None:
    wanted = _SIZES + (_MLA_SIZES if family.split_kv_b else ())
    optional = ("num_key_value_heads", "head_dim")
    for key in wanted + optional:
        value = config.get(key)
        if value is None and key in optional:
            continue
        if value is None:
            raise ModelFileError(f"{path}: lacks {key}")
        if type(value) is not int or not 0 < value < 2**31:
            raise ModelFileError(f"{path}: {key} must be a positive integer, not {value!r:.40}")


def _check_against_weights(config: dict, raw: Mapping[str, tuple], path: Path) -> None:
    """The sizes that set how much is built before the weights are read (the vocabulary
    table, the per-layer name map) must be those of the weights."""
    layers = {int(m[1]) for n in raw if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    n_layers = config["num_hidden_layers"]
    if n_layers > len(layers) or any(i not in layers for i in range(n_layers)):
        raise ModelFileError(f"{path}: num_hidden_layers is {n_layers} but the weights hold "
                             f"{len(layers)} layers")
    rows = [a.shape[0] for n, (a, _) in raw.items() if n.endswith("embed_tokens.weight")]
    if rows and rows[0] != config["vocab_size"]:
        raise ModelFileError(f"{path}: vocab_size is {config['vocab_size']} but "
                             f"embed_tokens.weight has {rows[0]} rows")


class _Tensors(Mapping):
    """name -> QuantTensor, each built when read and not kept: a stacked expert tensor or a
    permuted Q/K matrix is a copy, held only while its reader (a backend, the writer) needs
    it, so opening a large MoE folder does not hold a second copy of its experts."""

    def __init__(self, builders: dict[str, Callable[[], QuantTensor]]):
        self._builders = builders

    def __getitem__(self, name: str) -> QuantTensor:
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")
# all experts in one tensor, as transformers 5 holds them: gate_up_proj (n_expert, 2 * ff, d)
# with gate rows first, down_proj (n_expert, d, ff); some repositories store both transposed
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(?:\.weight)?$")


def _unfused(kind: str, arr: np.ndarray, ggml_type: T, d_model: int, name: str):
    """(projection, builder) of the stacked per-expert matrices in one fused expert tensor
    (n_expert, rows, d_model), in transformers' layout where a square one leaves a doubt."""
    if kind == "down_proj":
        if arr.shape[1] != d_model and arr.shape[2] == d_model:
            arr = arr.transpose(0, 2, 1)
        if arr.shape[1] != d_model:
            raise ModelFileError(f"{name}: shape {arr.shape} holds no ({d_model}, ff) matrices")
        return [("down_proj", lambda: (arr, ggml_type))]
    if arr.shape[2] != d_model and arr.shape[1] == d_model:
        arr = arr.transpose(0, 2, 1)
    if arr.shape[2] != d_model or arr.shape[1] % 2:
        raise ModelFileError(f"{name}: shape {arr.shape} holds no (2 * ff, {d_model}) matrices")
    ff = arr.shape[1] // 2
    return [("gate_proj", lambda: (arr[:, :ff], ggml_type)),
            ("up_proj", lambda: (arr[:, ff:], ggml_type))]


class HFSource:
    """config.json + *.safetensors + tokenizer files, seen as GGUF metadata and tensors."""

    def __init__(self, folder: str | Path):
        self.path = folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: no such folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelFileError(f"{folder}: no config.json (not a Hugging Face model folder)")
        # a vision-language model's text model (its config and tensors), else the model
        self.config, text_name = text_model(read_json_object(config_path))
        self.family: HFFamily = hf_family(self.config.get("model_type"))
        _check_config(self.config, self.family, config_path)
        files = _weight_files(folder)
        raw: dict[str, tuple[np.ndarray, T]] = {}
        for f in files:
            raw.update((name, t) for saved, t in read_safetensors(f).items()
                       if (name := text_name(saved)) is not None)
        _check_against_weights(self.config, raw, config_path)
        try:
            self.metadata: dict[str, Any] = self._metadata()
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            # the JSON files are untrusted: a field of an unexpected shape, named in the message
            raise ModelFileError(f"{folder}: config.json or a tokenizer file lacks a field or "
                                 f"has one of the wrong type ({type(exc).__name__}: {exc})"
                                 ) from None
        n_vocab = len(self.metadata["tokenizer.ggml.tokens"])
        self.tensors: Mapping[str, QuantTensor] = self._tensors(raw, n_vocab)

    def _metadata(self) -> dict[str, Any]:
        c, fam = self.config, self.family
        md: dict[str, Any] = {"general.architecture": fam.arch, "general.name": self.path.name}
        md.update(arch_metadata(fam, c))
        md.update(vocab_metadata(self.path, c["vocab_size"], fam.sentencepiece_first))
        if fam.arch == "gemma3" and (self.path / "tokenizer.model").is_file():
            md["tokenizer.ggml.add_space_prefix"] = False
        elif fam.arch == "llama":
            tc = self.path / "tokenizer_config.json"
            prefix = read_json_object(tc).get("add_prefix_space") if tc.is_file() else None
            if prefix is not None:
                md["tokenizer.ggml.add_space_prefix"] = bool(prefix)
        return md

    def _tensors(self, raw: dict[str, tuple[np.ndarray, T]], n_vocab: int) -> "_Tensors":
        c, fam = self.config, self.family
        n_layers = c["num_hidden_layers"]
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], n_layers)
        out: dict[str, Callable[[], QuantTensor]] = {}
        experts: dict[str, dict[int, tuple[np.ndarray, T]]] = defaultdict(dict)

        def put(hf_name: str, make: Callable[[], tuple[np.ndarray, T]]) -> None:
            """Name the tensor now; `make()` gives its raw elements when it is read."""
            hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedModelError(f"{self.path}: no GGUF name for tensor {hf_name}")
            shift = fam.norm_shift if hf_name.endswith("norm.weight") else 0.0

            def build() -> QuantTensor:
                arr, ggml_type = make()
                if keeps_f32(name, arr.ndim):
                    arr, ggml_type = _as_f32(arr, ggml_type) + np.float32(shift), T.F32
                return _quant(name, arr, ggml_type)
            out[name] = build

        heads = {"q_proj": c["num_attention_heads"], "k_proj": c.get("num_key_value_heads")}
        for hf_name, (arr, ggml_type) in raw.items():
            layer = re.match(r"model\.layers\.(\d+)\.", hf_name)
            if layer and int(layer.group(1)) >= n_layers:
                continue  # multi-token-prediction layers, which llama.cpp does not convert
            if hf_name == "lm_head.weight" and c.get("tie_word_embeddings"):
                continue
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "model.embed_tokens.weight" and fam.arch == "gemma3":
                arr = arr[:n_vocab]  # llama.cpp drops rows past the tokenizer's vocabulary
            if expert := _EXPERT.match(hf_name):
                experts[f"{expert[1]}.{expert[3]}"][int(expert[2])] = (arr, ggml_type)
            elif (fused := _FUSED_EXPERTS.match(hf_name)) and arr.ndim == 3:
                for proj, make in _unfused(fused[2], arr, ggml_type, c["hidden_size"], hf_name):
                    put(f"{fused[1]}.{proj}.weight", make)
            elif fam.split_kv_b and hf_name.endswith("kv_b_proj.weight"):
                h, nope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
                kv_b = arr.reshape(h, nope + v, arr.shape[-1])
                put(hf_name.replace("kv_b_proj", "k_b_proj"),
                    lambda kv_b=kv_b, t=ggml_type: (kv_b[:, :nope].transpose(0, 2, 1), t))
                put(hf_name.replace("kv_b_proj", "v_b_proj"),
                    lambda kv_b=kv_b, t=ggml_type: (kv_b[:, nope:], t))
            elif fam.permute_qk and (proj := hf_name.rsplit(".", 2)[-2]) in heads:
                put(hf_name, lambda a=arr, n=heads[proj], t=ggml_type: (_permute(a, n), t))
            else:
                put(hf_name, lambda a=arr, t=ggml_type: (a, t))
        if (factors := llama3_rope_factors(c)) is not None:
            out["rope_freqs.weight"] = lambda: _quant("rope_freqs.weight", factors, T.F32)
        for stacked, per_expert in experts.items():
            if sorted(per_expert) != list(range(len(per_expert))):
                raise ModelFileError(f"{self.path}: experts of {stacked} are not 0..n-1")
            arrays = [per_expert[i][0] for i in range(len(per_expert))]
            put(stacked, lambda a=arrays, t=per_expert[0][1]: (np.stack(a), t))
        self._check_complete(out)
        return _Tensors(out)

    def _check_complete(self, tensors: Mapping[str, object]) -> None:
        """Each layer has every tensor some layer of its kind (dense or MoE) has, and the
        model-level tensors are there: a missing tensor or shard is reported here."""
        wanted = ["token_embd.weight", "output_norm.weight"]
        if self.config.get("tie_word_embeddings") is False:
            wanted.append("output.weight")
        if missing := [n for n in wanted if n not in tensors]:
            raise ModelFileError(f"{self.path}: the weights lack {missing}")
        dense = self.config.get("first_k_dense_replace") or 0
        layers: list[set[str]] = [set() for _ in range(self.config["num_hidden_layers"])]
        for name in tensors:
            if name.startswith("blk."):
                _, i, rest = name.split(".", 2)
                layers[int(i)].add(rest)
        kinds: dict[bool, set[str]] = defaultdict(set)
        for i, have in enumerate(layers):
            kinds[i < dense] |= have
        for i, have in enumerate(layers):
            if missing := sorted(kinds[i < dense] - have):
                raise ModelFileError(f"{self.path}: layer {i} lacks tensors {missing}")
