#!/usr/bin/env python3
"""Write llama.cpp's importance matrix of SmolLM2 over tests/fixtures/eval_corpus.txt to
tests/fixtures/imatrix_smollm2_llama_cpp.gguf, for tests/real/test_imatrix_llama_cpp.py.

llama.cpp's own `llama-imatrix` (built from llama-cpp-python's source distribution by
scripts/llama_cpp_build.py), on the SmolLM2 Q4_1 file, the text's first CHUNKS chunks of CTX
tokens, 2 threads, its GGUF output (`imatrix.datasets` names the text).

How to regenerate: as scripts/make_perplexity_fixture.py says, then from the repository
root ``python scripts/make_llama_imatrix_fixture.py [--smollm2 PATH]``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llama_cpp_build import tool
from llama_cpp_model import smollm2_from_args

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "eval_corpus.txt"
OUT = ROOT / "tests" / "fixtures" / "imatrix_smollm2_llama_cpp.gguf"
CTX = 128
CHUNKS = 4   # the first 4 chunks of CTX tokens: enough statistics, a quick test


def main() -> None:
    path = smollm2_from_args(__doc__.split("\n")[0])
    tmp = OUT.with_name(OUT.name + ".tmp.gguf")
    # run beside the text, so the file records its name, not where this checkout lives
    subprocess.run([str(tool("llama-imatrix")), "-m", str(path), "-f", TEXT.name,
                    "-c", str(CTX), "--chunks", str(CHUNKS), "-t", "2", "--no-ppl",
                    "-o", str(tmp)], check=True, cwd=TEXT.parent)
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
