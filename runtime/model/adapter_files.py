"""LoRA adapter files: PEFT folders and GGUF LoRA files, written and read.

A PEFT adapter is a folder with `adapter_config.json` (r, lora_alpha, target_modules,
use_rslora, base_model_name_or_path) and `adapter_model.safetensors` holding
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (r, in) and `lora_B`
(out, r) per projection: what PEFT's `save_pretrained` writes and `PeftModel.from_pretrained`
reads.

A GGUF LoRA is what llama.cpp's `convert_lora_to_gguf.py` writes and `--lora` reads:
`general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, tensors
`blk.N.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r). llama.cpp scales a pair by
alpha / rank and has no rsLoRA, so an rsLoRA adapter is written with alpha * sqrt(rank).
In llama-family files Q and K rows are permuted for interleaved RoPE, so lora_b of attn_q
and attn_k is permuted the same way on the way out and un-permuted on the way in (A's rows are
the rank and do not move).

In memory an adapter is `LoraAdapter`: per (layer, module) the pair in Hugging Face row order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.quant.gguf_write import write_atomically

from .config import ModelConfig
from .families.gguf import family_for
from .weights import unpermute_rows

PEFT_CONFIG, PEFT_WEIGHTS, GGUF_NAME = "adapter_config.json", "adapter_model.safetensors", \
    "adapter.gguf"

# module -> GGUF tensor name (the shared experts' FFN of an MoE layer: its _shexp names)
_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa"}
_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoraAdapter:
    """LoRA pairs (A (r, in), B (out, r), float32, Hugging Face row order) by
    (layer, module), with their scaling."""

    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    alpha: float
    rank: int
    rslora: bool = False
    base_model: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _moe_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.moe is not None and cfg.moe.is_moe_layer(i)


def peft_module_name(cfg: ModelConfig, i: int, module: str) -> str:
    """The PEFT model's name of projection `module` of layer `i` (an MoE layer's MLP
    projections are its shared experts')."""
    block = "self_attn"
    if module in _FFN:
        block = "mlp.shared_experts" if _moe_layer(cfg, i) else "mlp"
    return f"base_model.model.model.layers.{i}.{block}.{module}"


def _gguf_name(cfg: ModelConfig, i: int, module: str) -> str:
    name = _GGUF[module] + ("_shexp" if module in _FFN and _moe_layer(cfg, i) else "")
    return f"blk.{i}.{name}.weight"


def _qk_heads(cfg: ModelConfig, module: str) -> int | None:
    """Heads whose rows llama's GGUF permutation moves in this module's B, or None."""
    if not family_for(cfg.arch).permuted_qk or cfg.mla:
        return None
    return {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(module)


def gguf_placement(cfg: ModelConfig, i: int, module: str,
                   n_rows: int) -> tuple[str, np.ndarray | None]:
    """The GGUF tensor that holds projection `module` of layer `i`, and the order that puts
    B's `n_rows` rows (Hugging Face order) into that tensor's row order (None: the same)."""
    heads = _qk_heads(cfg, module)
    order = np.argsort(unpermute_rows(n_rows, heads)) if heads else None
    return _gguf_name(cfg, i, module), order


# -- PEFT ---------------------------------------------------------------------------------
def write_peft(adapter: LoraAdapter, cfg: ModelConfig, folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (i, module), (a, b) in sorted(adapter.pairs.items()):
        name = peft_module_name(cfg, i, module)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    layers = sorted({i for i, _ in adapter.pairs})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank,
        "lora_alpha": adapter.alpha, "use_rslora": adapter.rslora, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({m for _, m in adapter.pairs}),
        "layers_to_transform": None if layers == list(range(cfg.n_layers)) else layers,
        "base_model_name_or_path": adapter.base_model,
    }
    write_atomically(folder / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), {"format": "pt"}))
    write_atomically(folder / PEFT_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))


def read_peft(folder: Path) -> LoraAdapter:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / PEFT_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelFileError(f"cannot read the PEFT adapter in {folder}: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{folder}: a {config.get('peft_type')} adapter, not LoRA")
    if config.get("target_parameters"):
        # PEFT on transformers 5 targets gate/up/down_proj of MoE models through the routed
        # experts' stacked parameters (their ranks in rank_pattern); routed experts take none
        raise UnsupportedModelError(
            f"{folder}: LoRA on parameters {sorted(config['target_parameters'])} (routed "
            f"experts' stacked matrices) is not supported; adapters go on attention and on "
            f"dense or shared-expert MLP projections")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UnsupportedModelError(f"{folder}: per-module ranks or alphas ({key}) are "
                                        f"not supported")
    if config.get("use_dora"):
        raise UnsupportedModelError(f"{folder}: DoRA adapters are not supported")
    pattern = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp|mlp\.shared_experts)\.(\w+)"
                         r"\.lora_([AB])(?:\.default)?\.weight$")
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        m = pattern.search(name)
        if m is None or m.group(2) not in _GGUF:
            raise UnsupportedModelError(f"{folder}: no place for adapter tensor {name}")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    return LoraAdapter(_pairs(halves, folder, "A", "B"), float(config["lora_alpha"]),
                       int(config["r"]), bool(config.get("use_rslora")),
                       config.get("base_model_name_or_path"))


def _pairs(halves, where, a_key, b_key):
    pairs = {}
    for key, h in halves.items():
        if set(h) != {a_key, b_key}:
            raise ModelFileError(f"{where}: layer {key[0]} {key[1]} lacks half of its pair")
        a, b = (np.asarray(h[k], np.float32) for k in (a_key, b_key))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ModelFileError(f"{where}: layer {key[0]} {key[1]}: A {a.shape} and B "
                                 f"{b.shape} are not a LoRA pair")
        pairs[key] = (a, b)
    return pairs


# -- GGUF ---------------------------------------------------------------------------------
def write_gguf_lora(adapter: LoraAdapter, cfg: ModelConfig, path: Path) -> None:
    import gguf

    alpha = adapter.alpha * (math.sqrt(adapter.rank) if adapter.rslora else 1.0)

    def write(tmp):
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        for (i, module), (a, b) in sorted(adapter.pairs.items()):
            name, order = gguf_placement(cfg, i, module, b.shape[0])
            if order is not None:  # back to the file's order: the inverse of the load's
                b = b[order]
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomically(path, write)


def read_gguf_lora(path: Path, cfg: ModelConfig) -> LoraAdapter:
    from diptych.quant.gguf_file import GGUFFile

    f = GGUFFile(path)
    md = f.metadata
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise ModelFileError(f"{path} is not a GGUF LoRA adapter (general.type="
                             f"{md.get('general.type')!r}, adapter.type={md.get('adapter.type')!r})")
    if md.get("general.architecture") != cfg.arch:
        raise UnsupportedModelError(f"{path} is an adapter for {md.get('general.architecture')}"
                                    f", the model is {cfg.arch}")
    names = {}
    for module, base in _GGUF.items():
        for i in range(cfg.n_layers):
            names[_gguf_name(cfg, i, module)] = (i, module)
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, qt in f.tensors.items():
        stem, _, half = name.rpartition(".")
        if stem not in names or half not in ("lora_a", "lora_b"):
            raise UnsupportedModelError(f"{path}: no place for adapter tensor {name}")
        halves.setdefault(names[stem], {})[half] = qt.dequantize().reshape(qt.shape)
    pairs = _pairs(halves, path, "lora_a", "lora_b")
    for (i, module), (a, b) in pairs.items():
        heads = _qk_heads(cfg, module)
        if heads:
            pairs[i, module] = (a, b[unpermute_rows(b.shape[0], heads)])
    if not pairs:
        raise ModelFileError(f"{path} holds no LoRA pairs")
    rank = next(iter(pairs.values()))[0].shape[0]
    return LoraAdapter(pairs, float(md.get("adapter.lora.alpha", rank)), rank)


def read_adapter(path: str | Path, cfg: ModelConfig) -> LoraAdapter:
    """An adapter from a GGUF LoRA file, a PEFT folder, or a folder holding either (ours
    hold both: the PEFT files are read)."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return read_peft(path)
        if (path / GGUF_NAME).is_file():
            return read_gguf_lora(path / GGUF_NAME, cfg)
        raise ModelFileError(f"{path} holds neither {PEFT_CONFIG} nor {GGUF_NAME}")
    if not path.is_file():
        raise ModelFileError(f"no adapter at {path}")
    return read_gguf_lora(path, cfg)


def write_adapter(adapter: LoraAdapter, cfg: ModelConfig, folder: str | Path) -> None:
    """Both forms into `folder`: the PEFT files and adapter.gguf."""
    folder = Path(folder)
    write_peft(adapter, cfg, folder)
    write_gguf_lora(adapter, cfg, folder / GGUF_NAME)
