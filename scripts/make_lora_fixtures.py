#!/usr/bin/env python3
"""Generate the LoRA fixtures: an adapter for SmolLM2-135M-Instruct Q4_1 as a PEFT folder
and as the GGUF LoRA diptych exports from it, and llama.cpp's logits with that GGUF LoRA.

CI never builds llama.cpp: tests/real/test_lora_llama_cpp.py reads what this script commits
under tests/fixtures/lora_smollm2/:

- ``adapter_config.json``, ``adapter_model.safetensors``: a PEFT adapter (rank 2, alpha 4,
  q_proj, k_proj, v_proj and down_proj of the even layers; A and B from a seeded normal,
  scaled so that the adapter moves the logits well beyond llama.cpp's rounding: PEFT's
  B = 0 would leave the model as it was);
- ``adapter.gguf``: diptych's export of that adapter (`write_gguf_lora`: llama's Q/K row
  permutation applied to lora_b of attn_q and attn_k), with its sha256 in
  ``adapter.gguf.sha256``; the test checks the exporter still writes it byte for byte;
- ``reference.npz``: llama.cpp's teacher-forced logits over tests/fixtures/eval_corpus.txt
  with ``Llama(..., lora_path=adapter.gguf)``, stored as scripts/make_reference_fixtures.py
  stores its corpus part (``corpus_tokens``, ``corpus_offsets``, ``corpus_topk_ids``,
  ``corpus_topk_logits``, ``corpus_logsumexp``), plus ``llama_cpp_version`` and
  ``adapter_sha256``;
- ``converted.gguf``: llama.cpp's ``convert_lora_to_gguf.py`` (from llama-cpp-python's
  source distribution, vendor/llama.cpp) run on the same PEFT folder (``--outtype f32``,
  ``--base`` a folder holding only the config.json of SmolLM2, written here from the GGUF
  file's hyper-parameters), and ``converted_reference.npz``: llama.cpp's logits with it, as
  above;
- ``fused_reference.npz``: llama.cpp's logits on the file ``diptych.fuse`` writes from the
  model and the PEFT folder (each tensor in its input type: the merged matrices requantized
  to Q4_1), as above, plus ``fused_sha256``: the file is not committed (it is the model's
  size); the test writes it again and checks that it is the same file.

How to regenerate (llama-cpp-python 0.3.36 built without AMX, as in
make_reference_fixtures.py), from the repository root::

    pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps   # the sdist
    tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/make_lora_fixtures.py --llama-cpp-src \
        llama_cpp_python-0.3.36/vendor/llama.cpp [--smollm2 PATH]

The model defaults to the diptych model cache. llama.cpp runs in a child process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_reference_fixtures import (LLAMA_KWARGS, TOPK, _logsumexp_rows, _topk_rows,  # noqa: E402
                                     default_model_path, read_corpus)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lora_smollm2"
MODULES = ("q_proj", "k_proj", "v_proj", "down_proj")
RANK, ALPHA, SEED = 2, 4.0, 13


def write_adapter_files(model_path: Path) -> str:
    """The PEFT folder and our adapter.gguf in OUT; the GGUF file's sha256."""
    from diptych.load_plan import LoadPlan
    from diptych.model.adapter_files import LoraAdapter, write_gguf_lora, write_peft
    from diptych.model.adapters import target_shape

    cfg = LoadPlan.open(model_path, "torch", n_ctx=16).config
    rng = np.random.default_rng(SEED)
    pairs = {}
    for i in range(0, cfg.n_layers, 2):
        for module in MODULES:
            n_out, n_in = target_shape(cfg, i, module)
            pairs[i, module] = ((rng.standard_normal((RANK, n_in)) / np.sqrt(n_in))
                                .astype(np.float32),
                                (rng.standard_normal((n_out, RANK)) * 0.2).astype(np.float32))
    adapter = LoraAdapter(pairs, ALPHA, RANK, base_model="SmolLM2-135M-Instruct")
    write_peft(adapter, cfg, OUT)
    write_gguf_lora(adapter, cfg, OUT / "adapter.gguf")
    digest = hashlib.sha256((OUT / "adapter.gguf").read_bytes()).hexdigest()
    (OUT / "adapter.gguf.sha256").write_text(digest + "\n")
    return digest


def convert_with_llama_cpp(model_path: Path, src: Path) -> None:
    """OUT/converted.gguf by llama.cpp's convert_lora_to_gguf.py from the PEFT folder."""
    import tempfile

    from diptych.load_plan import LoadPlan

    cfg = LoadPlan.open(model_path, "torch", n_ctx=16).config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
              "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
              "max_position_embeddings": cfg.context_length,
              "tie_word_embeddings": cfg.tied_output, "hidden_act": "silu"}
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "config.json").write_text(json.dumps(config))
        subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", base,
                        "--outtype", "f32", "--outfile", str(OUT / "converted.gguf"),
                        str(OUT)], check=True, cwd=src,
                       env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})


def fuse_with_diptych(model_path: Path, out: Path) -> str:
    """`diptych.fuse` of the model and the PEFT folder in OUT into `out`; its sha256."""
    import diptych

    diptych.fuse(model_path, OUT, out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def llama_cpp_logits(model_path: Path, lora: Path | None, out: Path) -> None:
    """llama.cpp (with the GGUF LoRA `lora`, if any) over the corpus (run in a child
    process)."""
    import llama_cpp
    from llama_cpp_model import open_llama

    extra = {} if lora is None else {"lora_path": str(lora)}
    llm = open_llama(model_path, **extra, **LLAMA_KWARGS)
    tokens, ids, logits, lse = [], [], [], []
    for seg in read_corpus():
        toks = llm.tokenize(seg.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(toks)
        rows = np.array(llm.scores[: llm.n_tokens], dtype=np.float32, copy=True)
        assert rows.shape[0] == len(toks) and np.isfinite(rows).all()
        i, v = _topk_rows(rows, TOPK)
        tokens.append(np.array(toks, np.int32))
        ids.append(i)
        logits.append(v)
        lse.append(_logsumexp_rows(rows))
    np.savez_compressed(
        out, corpus_tokens=np.concatenate(tokens),
        corpus_offsets=np.cumsum([0] + [len(t) for t in tokens]).astype(np.int32),
        corpus_topk_ids=np.concatenate(ids), corpus_topk_logits=np.concatenate(logits),
        corpus_logsumexp=np.concatenate(lse), llama_cpp_version=np.array(llama_cpp.__version__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", type=Path, default=None)
    p.add_argument("--llama-cpp-src", type=Path, required=True,
                   help="vendor/llama.cpp of llama-cpp-python's source distribution")
    p.add_argument("--child", nargs=3, type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    model_path = args.smollm2 or default_model_path("smollm2")
    if args.child is not None:   # MODEL LORA|- OUT
        model, lora, out = args.child
        llama_cpp_logits(model, None if str(lora) == "-" else lora, out)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    digest = write_adapter_files(model_path)
    convert_with_llama_cpp(model_path, args.llama_cpp_src.resolve())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.gguf"
        fused_digest = fuse_with_diptych(model_path, fused)
        for model, lora, out in (
                (model_path, OUT / "adapter.gguf", OUT / "reference.npz"),
                (model_path, OUT / "converted.gguf", OUT / "converted_reference.npz"),
                (fused, "-", OUT / "fused_reference.npz")):
            subprocess.run([sys.executable, __file__, "--llama-cpp-src",
                            str(args.llama_cpp_src), "--child", str(model), str(lora),
                            str(out)], check=True)
    for name, key, value in (("reference.npz", "adapter_sha256", digest),
                             ("fused_reference.npz", "fused_sha256", fused_digest)):
        with np.load(OUT / name) as f:
            ref = dict(f)
        ref[key] = np.array(value)
        np.savez_compressed(OUT / name, **ref)
    print(json.dumps({"adapter_sha256": digest, "fused_sha256": fused_digest,
                      "positions": int(len(ref["corpus_tokens"]))}))


if __name__ == "__main__":
    main()
