#!/usr/bin/env python3
"""Write llama.cpp's logits on diptych's own Q4_K_M file of SmolLM2 to
tests/fixtures/llama_cpp_on_our_q4_k_m.npz, for tests/real/test_our_quant_in_llama_cpp.py.

The file: `diptych.quantize(SmolLM2 Q4_1, ..., "Q4_K_M", allow_requantize=True)` (its
sha256 recorded, so the test knows it rebuilt the same file). llama.cpp (llama-cpp-python,
without its extra CPU buffer types) loads it and evaluates the first N tokens of
tests/fixtures/perplexity_smollm2.json teacher-forced; the fixture keeps, per position, its
top-32 token ids and logits and the logsumexp of the whole row (the layout of the
reference fixtures, read by tests/reference_metrics.py).

It also records, as ``llama_file_kl``, the mean KL(Q4_1 || file) over those positions,
diptych evaluating both, of llama.cpp's own Q4_K_M file made from the same Q4_1 file
(`llama_model_quantize`, allow_requantize): the test holds ours to at most 1.02x that.

How to regenerate: llama-cpp-python installed, then from the repository root
``python scripts/make_our_quant_fixture.py [--smollm2 PATH]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp_model import open_llama, smollm2_from_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quantize_table import llama_quantize  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "llama_cpp_on_our_q4_k_m.npz"
N, TOP = 256, 32


def mean_kl(base: Path, path: Path, tokens: list[int]) -> float:
    """Mean KL(base || model at `path`) of the next-token distributions at every position,
    diptych evaluating both."""
    import diptych
    from diptych.inference.perplexity import log_softmax

    p, q = (log_softmax(diptych.load(f, backend="torch", n_ctx=len(tokens)).logits(tokens))
            for f in (base, path))
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def main() -> None:
    import diptych
    import llama_cpp

    src = smollm2_from_args(__doc__.split("\n")[0])
    tokens = json.loads((FIXTURES / "perplexity_smollm2.json").read_text())["tokens"][:N]
    with tempfile.TemporaryDirectory() as tmp:
        ours = diptych.quantize(src, Path(tmp) / "ours-Q4_K_M.gguf", "Q4_K_M",
                                allow_requantize=True)
        sha = hashlib.sha256(ours.read_bytes()).hexdigest()
        llm = open_llama(ours, n_ctx=N, logits_all=True, n_threads=2, verbose=False)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[:N], dtype=np.float32)
        theirs = Path(tmp) / "llama-Q4_K_M.gguf"
        llama_quantize(src, theirs, "Q4_K_M")
        llama_file_kl = mean_kl(src, theirs, tokens)
    top = np.argsort(-logits, axis=1)[:, :TOP]
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float64)
    np.savez_compressed(OUT, llama_cpp_version=llama_cpp.__version__, file_sha256=sha,
                        tokens=np.asarray(tokens, np.int32), topk_ids=top.astype(np.int32),
                        topk_logits=np.take_along_axis(logits, top, axis=1),
                        logsumexp=lse, llama_file_kl=llama_file_kl)
    print(f"wrote {OUT.relative_to(ROOT)} (file sha256 {sha[:16]}..., llama.cpp's file: "
          f"KL {llama_file_kl:.6f})")


if __name__ == "__main__":
    main()
