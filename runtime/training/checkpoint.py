"""A training checkpoint: everything an exact resume needs, in one file written atomically.

`checkpoint.safetensors` in the run's folder holds the adapter (`param.K`) and the AdamW
moments (`m.K`, `v.K`) as float32, bit for bit, and in its metadata the run's state as JSON:
the options, the (layer, module) of each pair, the updates done and the losses so far. The
data position and every random choice follow from the options' seed and the updates done
(diptych.training.loop), so nothing else is needed. The file is written under a temporary
name and renamed, so a crash or Ctrl+C leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diptych.errors import ModelFileError
from diptych.quant.gguf_write import write_atomically

NAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    options: dict
    keys: list[tuple[int, str]]
    step: int                       # optimizer updates done
    params: list[np.ndarray]        # [A0, B0, A1, B1, ...]
    moments: list[tuple[np.ndarray, np.ndarray]]
    history: dict                   # losses so far: {"train": [...], "valid": [[step, loss]]}


def save(folder: Path, ck: Checkpoint) -> Path:
    from safetensors.numpy import save_file

    tensors = {}
    for k, (p, (m, v)) in enumerate(zip(ck.params, ck.moments)):
        tensors[f"param.{k}"], tensors[f"m.{k}"], tensors[f"v.{k}"] = p, m, v
    state = dict(options=ck.options, keys=ck.keys, step=ck.step, history=ck.history)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomically(folder / NAME, lambda tmp: save_file(
        tensors, str(tmp), {"state": json.dumps(state)}))


def load(folder: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / NAME
    if not path.is_file():
        raise ModelFileError(f"no checkpoint to resume from in {folder} (no {NAME})")
    try:
        with safe_open(str(path), "np") as f:
            state = json.loads(f.metadata()["state"])
            n = len(state["keys"]) * 2
            params = [f.get_tensor(f"param.{k}") for k in range(n)]
            moments = [(f.get_tensor(f"m.{k}"), f.get_tensor(f"v.{k}")) for k in range(n)]
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ModelFileError(f"{path} is not a readable checkpoint: {e}") from e
    # checkpoints from before compute_dtype trained with fp32 products: resume them so
    state["options"].setdefault("compute_dtype", "fp32")
    return Checkpoint(state["options"], [tuple(k) for k in state["keys"]], state["step"],
                      params, moments, state["history"])
