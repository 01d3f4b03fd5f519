#!/usr/bin/env python3
"""Write llama.cpp's perplexity of SmolLM2 on tests/fixtures/eval_corpus.txt to
tests/fixtures/perplexity_smollm2.json, for tests/real/test_perplexity.py.

llama-perplexity's chunked method over llama.cpp's own logits (llama-cpp-python, one fresh
context per chunk): the text tokenized by llama.cpp with the model's BOS rule, whole chunks
of CTX tokens, BOS as each chunk's first token, positions CTX/2 .. CTX-2 scored. The token
ids are stored so the test scores the same tokens.

llama.cpp rounds activations to 8 bits in its quantized dot products, which moves its
perplexity by about 1% on this Q4_1 model; the same method over an exact fp32 evaluation
(transformers on the weights dequantized by gguf-py, scripts/check_reference_fixtures.py)
is stored as well, as ``fp32_ppl``.

How to regenerate: llama-cpp-python built without AMX (see make_reference_fixtures.py),
then from the repository root ``python scripts/make_perplexity_fixture.py [--smollm2 PATH]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from llama_cpp_model import open_llama

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "eval_corpus.txt"
OUT = ROOT / "tests" / "fixtures" / "perplexity_smollm2.json"
CTX = 128


def chunked_ppl(chunk_logits, tokens: list[int], bos: int | None) -> tuple[float, int]:
    """The method: `chunk_logits(chunk)` gives a chunk's logits (CTX, vocab)."""
    nll, n = 0.0, 0
    for start in range(0, len(tokens) - CTX + 1, CTX):
        chunk = list(tokens[start:start + CTX])
        if bos is not None:
            chunk[0] = bos
        logits = np.asarray(chunk_logits(chunk), dtype=np.float64)[CTX // 2:CTX - 1]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        targets = chunk[CTX // 2 + 1:]
        nll -= logp[np.arange(len(targets)), targets].sum()
        n += len(targets)
    return float(np.exp(nll / n)), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2")
    args = ap.parse_args()
    if args.smollm2:
        path = Path(args.smollm2)
    else:
        from diptych.sources.default_model import default_model_path

        path = default_model_path()
    import llama_cpp

    llm = open_llama(path, n_ctx=CTX, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(TEXT.read_text(encoding="utf-8").encode(), add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None

    def llama_logits(chunk):
        llm.reset()
        llm.eval(chunk)
        return llm.scores[:CTX]

    ppl, n = chunked_ppl(llama_logits, tokens, bos)
    from check_reference_fixtures import hf_logits, load_smollm2_hf

    hf = load_smollm2_hf(path)
    fp32_ppl, _ = chunked_ppl(lambda chunk: hf_logits(hf, np.asarray(chunk)), tokens, bos)
    fixture = {"llama_cpp_version": llama_cpp.__version__, "model_file": path.name,
               "ctx": CTX, "tokens": [int(t) for t in tokens], "n_scored": n,
               "ppl": ppl, "fp32_ppl": fp32_ppl}
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture) + "\n")
    tmp.replace(OUT)
    print(f"perplexity {ppl:.4f} (fp32 {fp32_ppl:.4f}) over {n} tokens; "
          f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
