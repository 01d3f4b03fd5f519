#!/usr/bin/env python3
"""Write ggml's own q8_1 and q8_K blocks of a fixed input to
tests/fixtures/ggml_activation_blocks.json, for tests/backends/cpu/test_llama_rounding.py.

ggml's CPU backend quantizes a matrix product's activations to the weight type's
`vec_dot_type` before multiplying; gguf-py reproduces only q8_0 of those. This calls ggml's
reference quantizers (`quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`, from the libggml that
llama-cpp-python ships) on 8 rows of 512 heavy-tailed values (Student-t
with 3 degrees of freedom, one row scaled by 1e4 so that its fp16 sums round coarsely, one
row of zeros, one an evenly spaced ramp) and stores input and blocks as base64.

How to regenerate: llama-cpp-python 0.3.36 installed, then from the repository root
``python scripts/make_activation_blocks_fixture.py``.
"""

from __future__ import annotations

import base64
import ctypes
import json
from pathlib import Path

import numpy as np
from make_quantize_fixtures import ggml_library

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "ggml_activation_blocks.json"
ROWS, K = 8, 512
BLOCK_BYTES = {"q8_1": 36, "q8_K": 4 + 256 + 2 * 16}  # bytes per 32 / 256 values


def activations() -> np.ndarray:
    rng = np.random.default_rng(15)
    x = rng.standard_t(3, size=(ROWS, K)).astype(np.float32)
    x[1] *= 1e4
    x[2] = 0
    x[3] = np.arange(-K // 2, K // 2, dtype=np.float32) / 8
    return x


def quantize(lib, x: np.ndarray, kind: str) -> bytes:
    fn = getattr(lib, f"quantize_row_{kind}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    per = 32 if kind == "q8_1" else 256
    out = ctypes.create_string_buffer(x.size // per * BLOCK_BYTES[kind])
    src = np.ascontiguousarray(x, np.float32)
    fn(src.ctypes.data, ctypes.addressof(out), src.size)
    return out.raw


def main() -> None:
    import llama_cpp

    lib = ggml_library()
    x = activations()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    fixture = {"llama_cpp_version": llama_cpp.__version__, "shape": [ROWS, K],
               "x": b64(x.tobytes()),
               "q8_1": b64(quantize(lib, x, "q8_1")),
               "q8_K": b64(quantize(lib, x, "q8_K"))}
    OUT.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
