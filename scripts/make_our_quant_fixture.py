#!/usr/bin/env python3
"""Write tests/fixtures/llama_cpp_on_our_quants.npz, for tests/real/test_our_quant_in_llama_cpp.py:
llama.cpp's logits on diptych's own Q4_K_M and Q5_K_M files of SmolLM2, and what
llama.cpp's own files of those mixes measure against the same F16 base.

The base: llama.cpp's F16 file made from the SmolLM2 Q4_1 file (`llama_model_quantize`,
allow_requantize). diptych rebuilds it (tests/real/f16_base.py); the script stops unless
both hold the same tensors (name, type, shape, bytes), and records the sha256 of diptych's
file (``base_sha256``) so the test knows it rebuilt that base.

Per mix, from that base, over the first N tokens of tests/fixtures/perplexity_smollm2.json
teacher-forced, llama.cpp being llama-cpp-python without its extra CPU buffer types:
- diptych's file (`diptych.quantize(base, ..., MIX)`, its sha256 recorded so the test knows
  it rebuilt the same file), evaluated by llama.cpp: per position its top-32 token ids and
  logits and the logsumexp of the whole row (the layout of the reference fixtures, read by
  tests/reference_metrics.py);
- llama.cpp's file of the mix: ``llama_file_kl``, the mean KL(F16 || file), diptych
  evaluating both; and ``llama_file_agreement``, the mean and 95th percentile of
  KL(llama.cpp || diptych) on that file (reference_metrics.kl_ref_ours), the agreement a
  correct reader of the mix reaches against llama.cpp's 8-bit activation rounding.

How to regenerate: llama-cpp-python installed, then from the repository root
``python scripts/make_our_quant_fixture.py [--smollm2 PATH]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from llama_cpp_model import open_llama, smollm2_from_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from quantize_table import llama_quantize  # noqa: E402

from diptych.inference.perplexity import kl_divergence  # noqa: E402
from tests.real.f16_base import log_probs, write_f16_base  # noqa: E402
from tests.reference_metrics import kl_ref_ours  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "llama_cpp_on_our_quants.npz"
MIXES = ("Q4_K_M", "Q5_K_M")
N, TOP = 256, 32


def tensors_digest(path: Path) -> str:
    """sha256 over every tensor's name, type, shape and stored bytes, in name order."""
    h = hashlib.sha256()
    for t in sorted(gguf.GGUFReader(path).tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.tensor_type.name}:{t.shape.tolist()}".encode())
        h.update(np.ascontiguousarray(t.data).view(np.uint8).data)
    return h.hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_cpp_top(path: Path, tokens: list[int]) -> dict[str, np.ndarray]:
    """llama.cpp's teacher-forced top-TOP ids and logits and full-row logsumexp."""
    llm = open_llama(path, n_ctx=len(tokens), logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    logits = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    top = np.argsort(-logits, axis=1)[:, :TOP]
    m = logits.max(axis=1, keepdims=True)
    return {"topk_ids": top.astype(np.int32),
            "topk_logits": np.take_along_axis(logits, top, axis=1),
            "logsumexp": (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float64)}


def main() -> None:
    import diptych
    import llama_cpp

    src = smollm2_from_args(__doc__.split("\n")[0])
    tokens = json.loads((FIXTURES / "perplexity_smollm2.json").read_text())["tokens"][:N]
    fx = {"llama_cpp_version": llama_cpp.__version__, "tokens": np.asarray(tokens, np.int32)}
    with tempfile.TemporaryDirectory() as tmp:
        llama_base, base = Path(tmp) / "llama-F16.gguf", Path(tmp) / "F16.gguf"
        llama_quantize(src, llama_base, "F16")
        write_f16_base(src, base)
        if tensors_digest(base) != tensors_digest(llama_base):
            sys.exit("diptych's F16 base holds other tensors than llama.cpp's: compare them "
                     "tensor by tensor before recording anything")
        fx["base_sha256"] = sha256(base)
        base_logp = log_probs(base, tokens)
        for mix in MIXES:
            key = mix.lower()
            ours = diptych.quantize(base, Path(tmp) / f"ours-{mix}.gguf", mix)
            theirs = Path(tmp) / f"llama-{mix}.gguf"
            llama_quantize(llama_base, theirs, mix)
            fx |= {f"{key}_{k}": v for k, v in llama_cpp_top(ours, tokens).items()}
            fx[f"{key}_file_sha256"] = sha256(ours)
            theirs_logp = log_probs(theirs, tokens)
            kl_theirs = kl_divergence(base_logp, theirs_logp)
            fx[f"{key}_llama_file_kl"] = kl_theirs.mean()
            ref = llama_cpp_top(theirs, tokens)
            agree, _ = kl_ref_ours(theirs_logp, ref["topk_ids"], ref["topk_logits"],
                                   ref["logsumexp"])
            fx[f"{key}_llama_file_agreement"] = np.array([agree.mean(),
                                                          np.quantile(agree, 0.95)])
            diff = kl_divergence(base_logp, log_probs(ours, tokens)) - kl_theirs
            print(f"{mix}: KL(F16 || file) llama.cpp's {kl_theirs.mean():.6f}, diptych's "
                  f"{kl_theirs.mean() + diff.mean():.6f} (standard error of the paired "
                  f"difference {diff.std(ddof=1) / len(diff) ** 0.5:.6f}); llama.cpp vs "
                  f"diptych on llama.cpp's file: KL mean {agree.mean():.5f}, "
                  f"95th percentile {np.quantile(agree, 0.95):.5f}", flush=True)
    np.savez_compressed(OUT, **fx)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
