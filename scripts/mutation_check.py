#!/usr/bin/env python3
"""Targeted mutations that the test suite must catch.

Each mutation is one small, plausible bug (a sampler filter on the wrong distribution, a
dequantizer scale, a RoPE or YaRN formula, a window mask, a sandbox guard, a no-op TUI
action, an attention softmax scale off by 5%) applied to a temporary copy of the working
tree, one at a time; the tests named with it run on that copy and must fail. The script
prints a table (mutation, tests, caught/survived, seconds) and exits non-zero when a
mutation survives or its target text is no longer in the source (so the list cannot rot
silently: update the target when the code it points at moves).

    python scripts/mutation_check.py              # every mutation
    python scripts/mutation_check.py -k sampler   # those whose name contains "sampler"
    python scripts/mutation_check.py --baseline   # first check the unmutated copy passes
    python scripts/mutation_check.py --list

Not part of CI (the real-model and TUI mutations take minutes). Run it before closing work
that touches these places, and add a mutation when a capability lands.

The copy is imported instead of the installed package: ``PYTHONPATH`` points at a folder
holding a ``sitecustomize.py`` that maps ``diptych``, ``diptych.backends``, ``diptych.quant``
and ``diptych.tui`` to the copy's ``runtime/``, ``backends/``, ``quant/`` and ``tui/``
(child processes inherit it). Before the tests run, a child process checks that each of
those packages really resolves into the copy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"diptych": "runtime", "diptych.backends": "backends", "diptych.quant": "quant",
            "diptych.tui": "tui"}

SITECUSTOMIZE = '''
import importlib.machinery, importlib.util, os, sys

_ROOT = os.environ["DIPTYCH_MUTATION_TREE"]
_PACKAGES = %r


class _CopyFinder:
    """Resolves the diptych packages (and everything under them) inside the copy."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _PACKAGES:
            folder = os.path.join(_ROOT, _PACKAGES[name])
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        if name.startswith("diptych."):
            parent = sys.modules[name.rpartition(".")[0]]
            return importlib.machinery.PathFinder.find_spec(name, parent.__path__)
        return None


sys.meta_path.insert(0, _CopyFinder)
''' % (PACKAGES,)

IMPORT_CHECK = """
import os, sys, diptych, diptych.backends, diptych.quant, diptych.tui
root = os.path.realpath(os.environ["DIPTYCH_MUTATION_TREE"])
bad = [m.__name__ for m in (diptych, diptych.backends, diptych.quant, diptych.tui)
       if not os.path.realpath(m.__file__).startswith(root + os.sep)]
sys.exit(f"imported from outside the copy: {bad}" if bad else 0)
"""


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str          # file in the tree
    pattern: str       # regular expression (MULTILINE); must match exactly once
    replacement: str   # re.sub replacement
    tests: tuple       # pytest arguments (files, node ids, -k expressions)


def _dequant_scale(ggml_type: str, affine_k: bool = False) -> Mutation:
    """The dequantizer of `ggml_type` with its block scale d off by 1%."""
    fn, unpack = f"dequantize_{ggml_type.lower()}", f"unpack_{ggml_type.lower()}"
    head = rf"^(def {fn}\(blocks\):\n)"
    if affine_k:  # a one-line body: return _affine_k(*unpack_..(blocks))
        pattern = head + rf"    return _affine_k\(\*{unpack}\(blocks\)\)\n"
        replacement = (rf"\g<1>    d, *rest = {unpack}(blocks)\n"
                       r"    return _affine_k(d * 1.01, *rest)\n")
    else:
        pattern = head[:-1] + rf"    .*= {unpack}\(blocks\)\n)"
        replacement = r"\g<1>    d = d * 1.01\n"
    tests = ("tests/quant/test_dequant.py", "-k", f"bit_exact and {ggml_type}")
    return Mutation(f"dequant {ggml_type}: scale d x1.01", "quant/dequant.py", pattern,
                    replacement, tests)


SAMPLING = "tests/runtime/test_sampling.py"
TOKENIZER = "tests/runtime/test_tokenizer.py"
TOKENIZER_SANDBOX = (TOKENIZER, "-k", "sandbox")
ORACLE = "tests/runtime/test_graph_oracle.py"
DECODE_ATTENTION = "tests/backends/cpu/test_decode_attention.py"
DECODE_OPS = "tests/backends/cpu/test_decode_ops.py"
STEP_TAPE = "tests/backends/cpu/test_step_tape.py"


MUTATIONS = [
    # sampler order and semantics: top-p and min-p read the distribution before temperature,
    # and min-p is a fraction of the best probability
    Mutation("sampler: top-p on the tempered distribution", "runtime/inference/sampler.py",
             r"pr = be\.softmax\(vals\)$", "pr = be.softmax(vals / p.temperature)",
             (SAMPLING, "-k", "top_p")),
    Mutation("sampler: min-p absolute", "runtime/inference/sampler.py",
             r"near = vals >= best \+ self\.min_p_offset",
             "near = be.softmax(vals) >= p.min_p", (SAMPLING, "-k", "min_p")),
    # penalties on the ids seen only, padded per row; the CPU's top-k over wide rows
    Mutation("sampler: penalty history's short rows padded with id 0",
             "runtime/inference/sampler.py",
             r"idx\[r, n:\], num\[r, n:\] = idx\[r, n - 1\], num\[r, n - 1\]",
             "idx[r, n:], num[r, n:] = 0, 0", ("tests/runtime/test_sampler.py", "-k", "distinct")),
    Mutation("sampler: penalties also on ids counted zero", "runtime/inference/sampler.py",
             r"if empty_rows:", "if False:", ("tests/runtime/test_sampler.py", "-k", "distinct")),
    # the finite flag is the best candidate's: NaN and +inf sort first, -inf is probability 0
    Mutation("sampler: finite flag from an unsorted row's first logit (top-k, top-p off)",
             "runtime/inference/sampler.py",
             r"best = vals\[:, :1\] if idx is not None else be\.topk\(vals, 1\)\[0\]",
             "best = vals[:, :1]", ("tests/runtime/test_sampler.py", "-k", "non_finite")),
    Mutation("sampler: finite flag over every candidate (-inf beside finite logits flagged)",
             "runtime/inference/sampler.py",
             r"finite = be\.finite_rows\(best\)\.reshape\(rows, 1\)\n        keep = None",
             "finite = be.finite_rows(vals).reshape(rows, 1)\n        keep = None",
             ("tests/runtime/test_sampler.py", "-k", "non_finite")),
    Mutation("sampler: greedy's finite flag from the logits before the mask",
             "runtime/inference/sampler.py",
             r"\(x, pen, 1\)\n            finite = be\.finite_rows\(best\)",
             "(x, pen, 1)\n            finite = be.finite_rows(raw)",
             ("tests/runtime/test_sampler.py", "-k", "non_finite")),
    Mutation("sampler: MLX's top-k orders NaN last (a NaN row passes as finite)",
             "backends/mlx/backend.py", r"key = -mx\.where\(mx\.isnan\(x\), math\.inf, x\)",
             "key = -x", ("tests/runtime/test_sampler.py", "-k", "non_finite and mlx")),
    # a ring's snapshot copies the slots in use: all of them once it has wrapped
    Mutation("cache: a ring's snapshot one slot short", "runtime/inference/cache.py",
             r"\(i, min\(n, self\.specs\[i\]\.slots\)\)", "(i, min(n - 1, self.specs[i].slots))",
             ("tests/runtime/test_graph_oracle.py", "-k", "snapshot and torch")),
    Mutation("cache: a ring's snapshot copies the whole ring", "runtime/inference/cache.py",
             r"\(i, min\(n, self\.specs\[i\]\.slots\)\)", "(i, self.specs[i].slots)",
             ("tests/runtime/test_graph_oracle.py", "-k", "ring_wraps and torch")),
    Mutation("cache: MLX restores a snapshot into a fresh array (the slots past it lost)",
             "backends/mlx/backend.py", r"self\.k\[i\]\[:, :, :n\] = k\n",
             "self.k[i] = mx.array(k)\n",
             ("tests/runtime/test_graph_oracle.py", "-k", "snapshot and mlx")),
    Mutation("GGUF string ends: a chain's last string left out", "quant/gguf_file.py",
             r"pieces\.append\(ends\[j:last \+ 1\] \+ pos\)", "pieces.append(ends[j:last] + pos)",
             ("tests/quant/test_gguf_file.py", "-k", "found_as_the_loop")),
    Mutation("GGUF string ends: a chain followed past its breaks", "quant/gguf_file.py",
             r"last = min\(int\(breaks\[k\]\) if k < len\(breaks\) else len\(runs\) - 1,",
             "last = min(len(runs) - 1,", ("tests/quant/test_gguf_file.py", "-k", "found_as_the_loop")),
    Mutation("GGUF string ends: a string alone read by its first length byte",
             "quant/gguf_file.py", r'int\.from_bytes\(b\[at:at \+ 8\]\.tobytes\(\), "little"\)',
             "int(b[at])", ("tests/quant/test_gguf_file.py", "-k", "found_as_the_loop")),
    Mutation("GGUF string ends: the loop at the first odd string", "quant/gguf_file.py",
             r"^_ALONE = 1024", "_ALONE = 0", ("tests/quant/test_gguf_file.py", "-k", "found_as_the_loop")),
    Mutation("tokenizer: the GGUF's decoded merge list kept beside the BPE model",
             "runtime/text/tokenizer.py", r'\(md\.take\("tokenizer\.ggml\.merges"\)',
             '(md["tokenizer.ggml.merges"]',
             ("tests/quant/test_gguf_file.py", "-k", "not_decoded")),
    Mutation("sampler: greedy takes the last of equal maxima", "backends/torch/cpu/backend.py",
             r"x\.numpy\(\)\.argmax\(-1\)", "(x.shape[-1] - 1 - x.numpy()[:, ::-1].argmax(-1))",
             ("tests/backends/cpu/test_chunked_topk.py", "-k", "first_of_equals")),
    Mutation("sampler: chunked top-k drops the tail", "backends/torch/cpu/chunked_topk.py",
             r"maxima\[n - 1\] = _chunk_max\(x\[r\], n - 1, at, val\)",
             "maxima[n - 1] = -np.inf", ("tests/backends/cpu/test_chunked_topk.py",)),
    Mutation("sampler: chunked top-k ranks chunks by their least value",
             "backends/torch/cpu/chunked_topk.py", r"\.amax\(-1\)\.numpy\(\)",
             ".amin(-1).numpy()", ("tests/runtime/test_sampler_llama_cpp.py", "-k", "wide and torch")),
    # penalised logits read in place by the CPU's top-k (Backend.scatter_topk)
    Mutation("sampler: a chunk's maximum blind to the values put in it",
             "backends/torch/cpu/chunked_topk.py",
             r"            maxima\[c\] = _chunk_max\(x\[r\], c, at, val\)\n", "",
             ("tests/backends/cpu/test_chunked_topk.py", "-k", "put_in_place")),
    Mutation("sampler: the values put in place left out of the candidates",
             "backends/torch/cpu/chunked_topk.py", r"cand_v\[m \+ at\[q\] - lo\] = val\[q\]",
             "pass", ("tests/backends/cpu/test_chunked_topk.py", "-k", "put_in_place")),
    Mutation("sampler: chunked top-k puts the later id first among equals",
             "backends/torch/cpu/chunked_topk.py", r"out_i\[r, q - 1\] > i\)", "out_i[r, q - 1] < i)",
             ("tests/backends/cpu/test_chunked_topk.py", "-k", "equal_values")),
    Mutation("sampler: chunked top-k orders a NaN row itself",
             "backends/torch/cpu/chunked_topk.py", r"if maxima\[c\] != maxima\[c\]:",
             "if False:", ("tests/backends/cpu/test_chunked_topk.py", "-k", "nan")),
    Mutation("sampler: chunked top-k reads ids outside the row",
             "backends/torch/cpu/chunked_topk.py",
             r"if at\.size and \(at\[0\] < 0 or at\[-1\] >= width\):", "if False:",
             ("tests/backends/cpu/test_chunked_topk.py", "-k", "outside")),
    Mutation("sampler: the top-k blind to the penalised logits", "runtime/inference/sampler.py",
             r"else be\.scatter_topk\(x, \*pen, k\)", "else be.topk(x, k)",
             ("tests/runtime/test_sampler_llama_cpp.py", "-k", "wide and torch")),
    Mutation("threads: torch's count set before numba starts its OpenMP pool",
             "backends/torch/cpu/threads.py",
             r"    numba\.set_num_threads\(n\)\n    torch\.set_num_threads\(n\)\n",
             "    torch.set_num_threads(n)\n    numba.set_num_threads(n)\n",
             ("tests/backends/cpu/test_threads.py", "-k", "follow")),
    # each dequantizer's block scale
    _dequant_scale("Q4_0"),
    _dequant_scale("Q4_1"),
    _dequant_scale("Q5_0"),
    _dequant_scale("Q5_1"),
    _dequant_scale("Q8_0"),
    _dequant_scale("IQ4_NL"),
    _dequant_scale("Q2_K", affine_k=True),
    _dequant_scale("Q3_K"),
    _dequant_scale("Q4_K", affine_k=True),
    _dequant_scale("Q5_K", affine_k=True),
    _dequant_scale("Q6_K"),
    # positions and attention
    Mutation("RoPE: frequency exponent over dim - 2", "backends/base.py",
             r"np\.arange\(0, self\.dim, 2, dtype=np\.float64\) / self\.dim\)",
             "np.arange(0, self.dim, 2, dtype=np.float64) / (self.dim - 2))",
             (ORACLE, "-x", "-k", "full_sequence and llama")),
    Mutation("RoPE tables: grown by doubling only, short of the position asked for",
             "backends/torch/backend.py",
             r"size = max\(n_pos, 2 \* cached\[0\]\.shape\[0\] if cached else 256\)",
             "size = 2 * cached[0].shape[0] if cached else 256",
             ("tests/backends/cpu/test_decode_ops.py", "-k", "tables")),
    Mutation("YaRN: ramp reversed", "runtime/model/rope.py",
             r"keep = \(1\.0 - ramp\) \* s\.ext_factor", "keep = ramp * s.ext_factor",
             ("tests/runtime/test_rope_scaling.py", "-x")),
    Mutation("YaRN: attention factor 0.1 ln(s) + 1 dropped", "runtime/model/rope.py",
             r"s\.attn_factor or 0\.1 \* math\.log\(s\.factor\) \+ 1\.0", "s.attn_factor or 1.0",
             ("tests/runtime/test_rope_scaling.py", "-x")),
    Mutation("window mask: one key too many", "runtime/inference/slots.py",
             r"\(t - pos < spec\.window\)", "(t - pos <= spec.window)",
             (ORACLE, "-x", "-k", "mistral or gemma3")),
    Mutation("MLA: softmax scale without the RoPE part", "runtime/model/config.py",
             r"key_dim = self\.mla\.qk_nope \+ self\.mla\.qk_rope if",
             "key_dim = self.mla.qk_nope if",
             (ORACLE, "-x", "-k", "full_sequence and deepseek")),
    Mutation("attention: softmax scale off by 5%", "runtime/model/graph.py",
             r"_attend\(be, q, k, v, kv, i, step, cfg\.softmax_scale\(\)\)",
             "_attend(be, q, k, v, kv, i, step, cfg.softmax_scale() * 1.05)",
             ("tests/real/test_llama_cpp_agreement.py", "-x", "-k", "teacher_forced")),
    Mutation("decode attention: a ring's queries all see the last query's keys",
             "backends/torch/cpu/decode_attention.py", r"p >= 0 and p <= pos and",
             "p >= 0 and", (DECODE_ATTENTION, "-k", "step_arrays")),
    Mutation("decode attention: thread pool for short caches too",
             "backends/torch/cpu/decode_attention.py",
             r"kernel = _attend if lim\[-1\] >= MIN_KEYS else _attend_serial",
             "kernel = _attend",
             (DECODE_ATTENTION, "-k", "thread_pool")),
    Mutation("decode attention: fp16 cache written truncated, not rounded",
             "backends/torch/cpu/decode_attention.py",
             r"half = builder\.fptrunc\(args\[0\], ir\.HalfType\(\)\)",
             "half = builder.fptrunc(builder.bitcast(builder.and_(builder.bitcast(args[0], "
             "ir.IntType(32)), ir.Constant(ir.IntType(32), 0xFFFFE000)), ir.FloatType()), "
             "ir.HalfType())", (DECODE_ATTENTION, "-k", "store")),
    Mutation("decode attention: training's passes taken too",
             "backends/torch/cpu/decode_attention.py",
             r"and torch\.is_inference_mode_enabled\(\)\)", "and True)",
             (DECODE_ATTENTION, "-k", "takes_decode")),
    Mutation("decode attention: wide steps taken too", "backends/torch/cpu/decode_attention.py",
             r"q\.shape\[1\] <= MAX_QUERIES and ", "", (DECODE_ATTENTION, "-k", "takes_decode")),
    Mutation("decode attention: ring mask ignored", "backends/torch/cpu/decode_attention.py",
             r"if mask\.shape\[0\] > 0:", "if False:", (DECODE_ATTENTION, "-k", "sliding")),
    Mutation("decode attention: key blocks summed without rescaling",
             "backends/torch/cpu/decode_attention.py",
             r"w = exp_nonpositive\(row_max\[s, r\] - m\)", "w = np.float32(1.0)",
             (DECODE_ATTENTION, "-k", "2048 or large")),
    # the CPU backend's small-step kernels
    Mutation("decode ops: rms_norm's mean over one element too many",
             "backends/torch/cpu/decode_ops.py",
             r"inv = np\.float32\(1\.0\) / np\.sqrt\(s / np\.float32\(n\) \+ eps\)\n        for c in range\(n\):\n            o\[c\] = xr",
             "inv = np.float32(1.0) / np.sqrt(s / np.float32(n + 1) + eps)\n        for c in range(n):\n            o[c] = xr",
             (DECODE_OPS, "-k", "rms")),
    Mutation("decode ops: RoPE's second half turned the wrong way",
             "backends/torch/cpu/decode_ops.py", r"o\[i \+ half\] = hi \* c\[i\] \+ lo \* s\[i\]",
             "o[i + half] = hi * c[i] - lo * s[i]", (DECODE_OPS, "-k", "rope")),
    Mutation("decode ops: RoPE's pass-through channels dropped",
             "backends/torch/cpu/decode_ops.py", r"for i in range\(dim, d_h\):\n                    o\[i\] = xr\[i\]",
             "for i in range(dim, d_h):\n                    o[i] = 0", (DECODE_OPS, "-k", "rope")),
    Mutation("decode ops: sigmoid's branches swapped", "backends/torch/cpu/decode_ops.py",
             r"\(np\.float32\(1\.0\) if x >= 0 else e\)", "(e if x >= 0 else np.float32(1.0))",
             (DECODE_OPS, "-k", "glu")),
    Mutation("decode ops: training's passes taken too", "backends/torch/cpu/decode_ops.py",
             r"and torch\.is_inference_mode_enabled\(\)\)", "and True)",
             (DECODE_OPS, "-k", "small_inference")),
    Mutation("decode ops: prefill widths taken too", "backends/torch/cpu/decode_ops.py",
             r"return \(tokens <= MAX_TOKENS and ", "return (True and ",
             (DECODE_OPS, "-k", "small_inference")),
    # decode steps replayed from a tape (CPU)
    Mutation("decode attention: a ring query's window one key too wide",
             "backends/torch/cpu/decode_attention.py", r"and pos - p < window",
             "and pos - p <= window", (DECODE_ATTENTION, "-k", "step_arrays")),
    Mutation("decode attention: a query misses its own key's slot",
             "backends/torch/cpu/decode_attention.py", r"lim\[t\] = min\(pos \+ 1, slots\)",
             "lim[t] = min(pos, slots)", (DECODE_ATTENTION, "-k", "step_arrays")),
    # a position's bits the same at every step width (speculative verify on the int8 path)
    Mutation("decode attention: a ring's rows all run over the last query's slots",
             "backends/torch/cpu/decode_attention.py",
             r"lim\[t\] = min\(pos \+ 1, slots\)\n        if window == 0:",
             "lim[t] = min((pos if window == 0 else positions[0, positions.shape[1] - 1]) + 1, "
             "slots)\n        if window == 0:", (DECODE_ATTENTION, "-k", "same_bits")),
    Mutation("decode attention: every row runs over the step's widest key count",
             "backends/torch/cpu/decode_attention.py",
             r"counts\[r\] = min\(keys\.shape\[0\], max\(0, lim\[r // group\] - j0\)\)",
             "counts[r] = min(keys.shape[0], max(0, lim.max() - j0))", (DECODE_ATTENTION,)),
    Mutation("decode ops: strided rows handed to the kernels",
             "backends/torch/cpu/decode_ops.py",
             r"if a\.size and not \(rows\.flags\.c_contiguous and np\.may_share_memory\(rows, a\)\):",
             "if a.size and not np.may_share_memory(rows, a):", (DECODE_OPS, "-k", "same_bits")),
    Mutation("step tape: a read from outside the tape goes unnoticed",
             "backends/torch/cpu/step_tape.py", r"if not all\(self\.owns\(a\) for a in reads\):",
             "if False:", (STEP_TAPE,)),
    Mutation("step tape: replays skip copying the new inputs",
             "backends/torch/cpu/step_tape.py", r"slot\.copy_\(a\)", "pass",
             (STEP_TAPE, "-k", "equal_the_graph")),
    Mutation("step tape: the replayed output handed out, not copied",
             "backends/torch/cpu/step_tape.py", r"return out\.clone\(\)\n", "return out\n",
             (STEP_TAPE, "-k", "own_logits")),
    Mutation("step tape: rope tables frozen at the recorded step's positions",
             "backends/torch/cpu/backend.py", r"if tables is None or tables\[0\]\.shape\[0\] <= top:",
             "if tables is None:", (STEP_TAPE, "-k", "rope")),
    Mutation("step tape: a linear's LoRA pairs left on the tape",
             "backends/torch/cpu/backend.py",
             r"step_tape\.untaped\(\)  # LoRA pairs", "pass  # LoRA pairs",
             ("tests/real/test_finetune.py",)),
    # the CPU thread governor
    Mutation("threads: contention never drops the kernels to one thread",
             "backends/torch/cpu/threads.py", r"    if GOVERNOR\.contended:\n        n = 1\n", "",
             ("tests/backends/cpu/test_threads.py", "-k", "governor")),
    Mutation("threads: contention read the wrong way round", "backends/torch/cpu/threads.py",
             r"self\.contended = self\._cpu < self\.LOW \* self\._wall",
             "self.contended = self._cpu > self.LOW * self._wall",
             ("tests/backends/cpu/test_threads.py", "-k", "governor or back_off")),
    Mutation("threads: failed trials do not back off", "backends/torch/cpu/threads.py",
             r"min\(2 \* self\._retry, self\.MAX_RETRY\) if self\._trial else self\.RETRY",
             "self.RETRY", ("tests/backends/cpu/test_threads.py", "-k", "back_off")),
    # tokenization: llama.cpp's special-token split and SentencePiece merge order
    Mutation("tokenizer: special tokens shortest first", "runtime/text/special_tokens.py",
             r"for length in self\._lengths:", "for length in reversed(self._lengths):",
             (TOKENIZER,)),
    Mutation("tokenizer: same-length special tokens leftmost first",
             "runtime/text/special_tokens.py", r"hits\.sort\(\)",
             "hits.sort(key=lambda h: h[1])", (TOKENIZER,)),
    Mutation("tokenizer: SentencePiece ties merge the rightmost pair", "runtime/text/spm.py",
             r"heappush\(heap, \(-scores\[token\], left,",
             "heappush(heap, (-scores[token] - 1e-9 * left, left,",
             (TOKENIZER,)),
    Mutation("tokenizer: no space prefix after a special token", "runtime/text/tokenizer.py",
             r"                after_special = True\n", "", (TOKENIZER,)),
    # the chat template sandbox (templates inside model files are untrusted)
    Mutation("sandbox: integer width unchecked", "runtime/text/template_sandbox.py",
             r"^MAX_INT_BITS = 4096", "MAX_INT_BITS = 10**12", TOKENIZER_SANDBOX),
    Mutation("sandbox: one render's step budget removed", "runtime/text/template_sandbox.py",
             r"^MAX_STEPS = 1_000_000", "MAX_STEPS = 10**12", TOKENIZER_SANDBOX),
    Mutation("sandbox: mutable sandbox", "runtime/text/template_sandbox.py",
             r"class BoundedSandbox\(ImmutableSandboxedEnvironment\)",
             "class BoundedSandbox(__import__('jinja2.sandbox').sandbox.SandboxedEnvironment)",
             TOKENIZER_SANDBOX),
    Mutation("sandbox: unsafe attribute renders empty", "runtime/text/chat_template.py",
             r"def unsafe_undefined\(", "def _not_unsafe_undefined(", TOKENIZER_SANDBOX),
    # speculative decoding's acceptance rule
    Mutation("speculative: residual = p", "runtime/inference/speculative.py",
             r"return np\.maximum\(p - q, 0\.0\)", "return p",
             ("tests/runtime/test_speculative_lossless.py", "-k", "exact")),
    Mutation("speculative: no bonus token", "runtime/inference/speculative.py",
             r"return list\(drafts\[:n\]\) \+ \[token\]",
             "return list(drafts[:n]) + ([token] if n < len(drafts) or not drafts else [])",
             ("tests/runtime/test_speculative_lossless.py", "-k", "exact")),
    Mutation("speculative: penalties not updated for the drafts",
             "runtime/inference/speculative.py",
             r"return \[window \+ drafts\[:j\] for j in range\(len\(drafts\) \+ 1\)\]",
             "return [window] * (len(drafts) + 1)",
             ("tests/runtime/test_speculative_distribution.py", "-k", "follow and penalty")),
    Mutation("speculative: unfiltered q", "runtime/inference/speculative.py",
             r"be\.to_numpy\(drawn\.probs\)\[0\]",
             "be.to_numpy(be.softmax(be.float32(logits)))[0]",
             ("tests/runtime/test_speculative_distribution.py", "-k", "follow and top-p")),
    # the draft-length policy
    Mutation("draft length: a draft model's stops are not counted",
             "runtime/inference/speculative.py",
             r"self\.stopped = DECAY \* self\.stopped \+ \(drafted < asked\)",
             "self.stopped = DECAY * self.stopped",
             ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: the step that stopped a draft short costs nothing",
             "runtime/inference/speculative.py",
             r"self\.costs\.draft \* sum\(reach\[:-1\]\)", "self.costs.draft * sum(reach[1:])",
             ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: the prior's verdict taken before any draft is tried",
             "runtime/inference/speculative.py", r"self\.judged < EVIDENCE",
             "self.judged < 0", ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: a draft rejected at its first token judged whole",
             "runtime/inference/speculative.py",
             r"self\.judged \+= accepted \+ \(accepted < drafted\) if drafted else 1",
             "self.judged += drafted if drafted else 1", ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: the first passes draft one token each",
             "runtime/inference/speculative.py",
             r"hoped = max\(range\(top \+ 1\), key=lambda k: self\.value\(k, a=1\.0\)\)",
             "hoped = min(top, 1)", ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: a prior as heavy as two drafts",
             "runtime/inference/speculative.py",
             r"self\.accepted, self\.rejected = 0\.5, 0\.5", "self.accepted, self.rejected = 1.0, 1.0",
             ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: a width-2 verify priced as the wider steps' extra token",
             "runtime/inference/speculative.py",
             r"first = self\.verify if self\.first is None else self\.first",
             "first = self.verify", ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: one lucky probe resumes drafting", "runtime/inference/speculative.py",
             r"^CONFIRM = 3 ", "CONFIRM = 1 ", ("tests/runtime/test_draft_length.py",)),
    Mutation("draft length: failed probes do not back off", "runtime/inference/speculative.py",
             r"min\(2 \* self\.probe_every, PROBE_MAX\)", "self.probe_every",
             ("tests/runtime/test_draft_length.py",)),
    Mutation("speculative costs: stored costs never read back",
             "runtime/inference/speculative_costs.py", r"    if stored is not None:\n",
             "    if False:\n", ("tests/runtime/test_speculative_costs.py",)),
    Mutation("speculative costs: stored values taken unchecked",
             "runtime/inference/speculative_costs.py", r"return costs if ok else None",
             "return costs", ("tests/runtime/test_speculative_costs.py",)),
    Mutation("speculative costs: a changed model file keeps its old costs",
             "runtime/inference/speculative_costs.py",
             r':\{st\.st_size\}:\{st\.st_mtime_ns\}"', ':{st.st_size}"',
             ("tests/runtime/test_speculative_costs.py",)),
    Mutation("bf16 training products: never taken", "backends/torch/cpu/qlinear.py",
             r'return getattr\(_products, "bf16", False\)', "return False",
             ("tests/backends/cpu/test_qlinear.py", "tests/runtime/training/test_peft_oracle.py")),
    Mutation("bf16 training products: input gradients left in fp32",
             "backends/torch/cpu/qlinear.py", r"        if _bf16\(\):  # grad_y's columns",
             "        if False:  # grad_y's columns", ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("fast numerics: bf16 tiles taken without AMX",
             "backends/torch/cpu/qlinear.py",
             r"_I8_BF16_TILES_FROM\.get\(self\.ggml_type\) if AMX_BF16 else None",
             "_I8_BF16_TILES_FROM.get(self.ggml_type)", ("tests/backends/cpu/test_gemm_i8.py",)),
    Mutation("gemm_s decode: every slice of a group reads its first 16 rows",
             "backends/torch/cpu/kernel_source.py", r'f", \{16 \* s\}\)", body\)',
             '", 0)", body)', ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("gemm_s decode: one slice's sums added to another's",
             "backends/torch/cpu/kernel_source.py", r'f"y0_\{s\}", re\.sub',
             'f"y0_{min(s, 1)}", re.sub', ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("bf16 tiles: ties rounded up, not to even", "backends/torch/cpu/llvm_bits.py",
             r"rounded = builder\.add\(u, builder\.add\(odd, ir\.Constant\(_I32, 0x7FFF\)\)\)",
             "rounded = builder.add(u, ir.Constant(_I32, 0x8000))",
             ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("bf16 tiles: truncated, not rounded", "backends/torch/cpu/llvm_bits.py",
             r"high = builder\.trunc\(builder\.lshr\(rounded,",
             "high = builder.trunc(builder.lshr(u,", ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("bf16 tiles: each tile dequantized from the first row group",
             "backends/torch/cpu/qlinear.py",
             r"deq\(np\.arange\(g0, -\(-row1 // R\), dtype=np\.int64\), g0,",
             "deq(np.arange(0, -(-row1 // R) - g0, dtype=np.int64), 0,",
             ("tests/backends/cpu/test_qlinear.py",)),
    Mutation("fast numerics: the wide steps' tiles multiplied in fp32",
             "backends/torch/cpu/qlinear.py", r"self\._tiled\(torch\.from_numpy\(xn\), bf16=True\)",
             "self._tiled(torch.from_numpy(xn))", ("tests/backends/cpu/test_gemm_i8.py",)),
    Mutation("fast numerics: gemm_i8 at every width", "backends/torch/cpu/qlinear.py",
             r'return "tiles_bf16" if start is not None and m >= start else "gemm_i8"',
             'return "gemm_i8"', ("tests/backends/cpu/test_gemm_i8.py",)),
    Mutation("step keys: the values read from the keys", "backends/torch/backend.py",
             r"None if v is None else v\.transpose\(1, 2\),",
             "None if v is None else k.transpose(1, 2),",
             ("tests/runtime/training/test_peft_oracle.py",)),
    Mutation("step keys: every layer with the first layer's view", "backends/torch/backend.py",
             r"                                     kv\.specs\[layer\], view, scale\)",
             "                                     kv.specs[layer], step.views[0], scale)",
             ("tests/runtime/training/test_peft_oracle.py",)),
    Mutation("CPU embedding table: each row's neighbour", "backends/torch/cpu/embedding_table.py",
             r"dequantize_rows\(self\._data\[ids\]",
             "dequantize_rows(self._data[np.minimum(ids + 1, self.shape[0] - 1)]",
             ("tests/backends/cpu/test_qlinear.py::test_embed_rows",
              "tests/backends/cpu/test_step_tape.py")),
    Mutation("MLX step keys: the values read from the keys", "backends/mlx/backend.py",
             r"vc = None if v is None else v\.transpose\(0, 2, 1, 3\)",
             "vc = None if v is None else k.transpose(0, 2, 1, 3)",
             ("tests/runtime/training/test_mlx_training.py",)),
    Mutation("bf16 training products: the trainer's steps outside the context",
             "runtime/training/loop.py",
             r"            with self\.be\.training_products\(self\.compute_dtype\):",
             '            with self.be.training_products("fp32"):',
             ("tests/runtime/training/test_peft_oracle.py",)),
    Mutation("MLX loss piece: the softcap's derivative dropped", "backends/mlx/backend.py",
             r"        g = g \* \(1 - t \* t\)\n", "        g = g\n",
             ("tests/runtime/training/test_mlx_training.py",)),
    Mutation("MLX loss piece: a quantized head's gradient lost", "backends/mlx/backend.py",
             r"grad_h = mx\.quantized_matmul\(g, ",
             "grad_h = mx.quantized_matmul(g * 0, ",
             ("tests/runtime/training/test_mlx_training.py",)),
    Mutation("prompt lookup: no alignment, n-gram only", "runtime/inference/speculative.py",
             r"        start = self\._aligned\(ids\)\n", "        start = None\n",
             ("tests/runtime/test_lookup_draft.py",)),
    Mutation("prompt lookup: earliest alignment", "runtime/inference/speculative.py",
             r"score == score\.max\(\)\)\[-1\]", "score == score.max())[0]",
             ("tests/runtime/test_lookup_draft.py",)),
    Mutation("prompt lookup: earliest n-gram match", "runtime/inference/speculative.py",
             r"length == length\.max\(\)\)\[-1\]", "length == length.max())[0]",
             ("tests/runtime/test_lookup_draft.py",)),
    Mutation("speculative: a pass without drafts drawn through the acceptance rule",
             "runtime/inference/speculative.py", r"    if not k:   # nothing drafted",
             "    if False:   # nothing drafted",
             ("tests/runtime/test_speculative.py", "-k", "nothing_is_plain")),
    Mutation("speculative: a probe catches the draft model up on everything",
             "runtime/inference/speculative.py", r"if probe and len\(view\) - keep",
             "if False and len(view) - keep", ("tests/runtime/test_speculative.py", "-k",
                                              "probe_far")),
    Mutation("speculative: settle prefills a draft model far behind",
             "runtime/inference/speculative.py", r"                seq\.keep_prefix\(held\)",
             "                self._sync(ctx[:-1])", ("tests/runtime/test_speculative.py", "-k",
                                                     "probe_far")),
    # constrained decoding with speculation
    Mutation("constrained speculation: draft q not masked", "runtime/inference/speculative.py",
             r"mask = self\.mask if grammar is None else device_mask\(",
             "mask = self.mask if True else device_mask(",
             ("tests/runtime/test_constrained_speculative.py", "-k", "masked")),
    Mutation("constrained speculation: target p not masked", "runtime/inference/speculative.py",
             r"mask = device_mask\(seq\.backend, grammar\.rows\(len\(drafts\)\)\)",
             "mask = None", ("tests/runtime/test_constrained_speculative.py", "-k", "greedy")),
    Mutation("constrained speculation: grammar not rolled back",
             "runtime/inference/speculative.py", r"self\.constraint\.rollback\(self\.fed\)",
             "None", ("tests/runtime/test_constrained_speculative.py", "-k", "fresh_one")),
    # the server's scheduler
    Mutation("server: a long prompt prefilled in one go", "runtime/server/scheduler.py",
             r"^PREFILL_CHUNK = 64", "PREFILL_CHUNK = 1 << 30",
             ("tests/server/test_openai_server.py", "-k", "long_prompt")),
    Mutation("server: a cancelled job runs on", "runtime/server/scheduler.py",
             r"for run in \[r for r in self\._running if r\.job\.cancelled\]:",
             "for run in []:", ("tests/server/test_openai_server.py", "-k", "disconnect")),
    # the CPU kernels' dispatch, llama.cpp numerics, tool grammars, the LoRA linear
    Mutation("CPU linear: gemv1 per row computes the first row only",
             "backends/torch/cpu/qlinear.py", r"for i in range\(xn\.shape\[0\]\):",
             "for i in range(1):", ("tests/backends/cpu/test_qlinear.py", "-k", "every_path")),
    Mutation("CPU linear: gemm_s stores a block's missing rows",
             "backends/torch/cpu/kernel_source.py", r'f"if left > \{i\}:',
             'f"if {i} < 4:', ("tests/backends/cpu/test_qlinear.py", "-k", "row_blocks")),
    Mutation("CPU linear: gemm_s's units sharing bytes all read the first unit's x",
             "backends/torch/cpu/kernel_source.py", r"at\(x\{i\}, base\{c\} \+ j \+ \{e\}\)",
             "at(x{i}, base0 + j + {e})",
             ("tests/backends/cpu/test_qlinear.py", "-k", "row_blocks and Q6_K")),
    Mutation("CPU linear: gemm_s's second chain of a 32-element unit left out of the sum",
             "backends/torch/cpu/kernel_source.py", r"for c, e in sums\]\)",
             "for c, e in sums if e == 0])",
             ("tests/backends/cpu/test_qlinear.py", "-k", "row_blocks and Q4_K")),
    Mutation("KV cache: zero-filled when allocated", "backends/torch/backend.py",
             r'if device == "cpu" and dtype in _NUMPY_DTYPES:', "if False:",
             ("tests/backends/cpu/test_kv_memory.py",)),
    Mutation("CPU kernels: the launcher skips its last row group",
             "backends/torch/cpu/kernel_source.py", r"for j in prange\(index\.shape\[0\]\):",
             "for j in prange(index.shape[0] - 1):",
             ("tests/backends/cpu/test_qlinear.py", "-k", "every_path")),
    Mutation("CPU repack: a mapped tensor's pages held until it is whole",
             "backends/torch/cpu/repack.py",
             r"        if release is not None:\n            release\(\)\n",
             "", ("tests/backends/cpu/test_qlinear.py", "-k", "mapped_tensor")),
    Mutation("CPU repack: chunks still queued copied on after a failure",
             "backends/torch/cpu/repack.py", r"        list\(_pool\(threads\)\.map\(copy, chunks\)\)",
             "        for f in [_pool(threads).submit(copy, c) for c in chunks]:\n            f.result()",
             ("tests/backends/cpu/test_qlinear.py", "-k", "failed_chunk")),
    Mutation("CPU repack: the file's pages never let go", "quant/gguf_file.py",
             r"                self\._mm\.madvise\(mmap\.MADV_DONTNEED, first, start \+ length - first\)",
             "                pass", ("tests/backends/cpu/test_qlinear.py", "-k", "mapped_tensor")),
    Mutation("load: the file's pages let go after every tensor", "runtime/load_plan.py",
             r"if release and unreleased >= RELEASE_BYTES:", "if release:",
             ("tests/runtime/test_load_plan.py", "-k", "pages_go")),
    Mutation("load: the last tensors' pages kept after the load", "runtime/load_plan.py",
             r"        if release:\n            release\(\)\n        return weights",
             "        return weights", ("tests/runtime/test_load_plan.py", "-k", "pages_go")),
    Mutation("CPU repack: a tensor's release lets the whole file's pages go",
             "quant/gguf_file.py", r"functools\.partial\(self\.release_pages, start, nbytes\)",
             "functools.partial(self.release_pages, 0)",
             ("tests/quant/test_gguf_file.py", "-k", "own_pages")),
    Mutation("CPU repack: a stacked weight lets only its first part's pages go",
             "backends/torch/cpu/qlinear.py",
             r"releases = \[p\.release for p in parts if p\.release is not None\]",
             "releases = [p.release for p in parts[:1] if p.release is not None]",
             ("tests/backends/cpu/test_qlinear.py", "-k", "every_parts_pages")),
    Mutation("CPU repack: a stacked weight's parts written over one another",
             "backends/torch/cpu/repack.py", r"        g_base \+= groups\n", "",
             ("tests/backends/cpu/test_qlinear.py", "-k", "stacked_parts")),
    Mutation("CPU repack: a tile's interleaves take each other's halves",
             "backends/torch/cpu/repack.py", r"    first = n // 2 if hi else 0",
             "    first = 0 if hi else n // 2",
             ("tests/backends/cpu/test_qlinear.py", "-k", "rows_transposed")),
    Mutation("CPU repack: the columns past the last whole tile left unwritten",
             "backends/torch/cpu/repack.py", r"for c in range\(full, row_bytes\):",
             "for c in range(full, full):",
             ("tests/backends/cpu/test_qlinear.py", "-k", "rows_transposed")),
    Mutation("CPU repack: a group's last 16 rows left out of the tiles",
             "backends/torch/cpu/repack.py", r"for r in range\(0, R, 16\):",
             "for r in range(0, R - 16, 16):",
             ("tests/backends/cpu/test_qlinear.py", "-k", "rows_transposed")),
    # repacked weights kept on disk (prepared_cache.py)
    Mutation("repack cache: a weight found by its name alone",
             "runtime/sources/prepared_cache.py",
             r"    return f\"\{name\}:\{type_name\}:\{'x'\.join\(map\(str, shape\)\)\}:\{h\.hexdigest\(\)\}\"",
             "    return name", ("tests/backends/cpu/test_prepared_cache.py", "-k", "found_by")),
    Mutation("repack cache: the fingerprint blind to reordered rows",
             "runtime/sources/prepared_cache.py",
             r"for r in sorted\(\{min\(1, n - 1\), n // 3,", "for r in sorted({0, n // 3,",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "found_by")),
    Mutation("repack cache: a truncated file read as whole",
             "runtime/sources/prepared_cache.py",
             r' \\\n            or index\["size"\] != os\.fstat\(f\.fileno\(\)\)\.st_size:', ":",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "damaged")),
    Mutation("repack cache: a failed load's weights written",
             "runtime/sources/prepared_cache.py",
             r"    try:\n        yield\n    finally:\n        _store\.reset\(token\)\n    store\.save\(\)",
             "    try:\n        yield\n    finally:\n        _store.reset(token)\n        store.save()",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "failed_load")),
    Mutation("repack cache: the most recently used evicted first",
             "runtime/sources/prepared_cache.py",
             r"    for kf in files:   # least recently used first",
             "    for kf in files[::-1]:",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "eviction")),
    Mutation("repack cache: a file for a removed model kept while there is room",
             "runtime/sources/prepared_cache.py",
             r"        if kf\.stale:\n            kf\.path\.unlink\(missing_ok=True\)\n        else:\n            files\.append\(kf\)",
             "        files.append(kf)",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "eviction or rewritten")),
    Mutation("repack cache: the layout left out of the file's name",
             "runtime/sources/prepared_cache.py",
             r'if k != "model"\}, sort_keys=True\)', 'if k not in ("model", "layout")}, sort_keys=True)',
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "found_by")),
    Mutation("rm: a model's kept copies left behind", "runtime/sources/model_cache.py",
             r"            kept = forget\(path\)\n", "            kept = []\n",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "rm_removes")),
    Mutation("repack cache: the cache mapped read-only",
             "runtime/sources/prepared_cache.py",
             r"prot=mmap\.PROT_READ \| mmap\.PROT_WRITE\)", "prot=mmap.PROT_READ)",
             ("tests/backends/cpu/test_prepared_cache.py", "-k", "found_by")),
    Mutation("kernel cache: precompile hands kernels out in the order of their types",
             "backends/torch/cpu/kernel_cache.py",
             r"key=lambda task: \(_COMPILE_ORDER\.index\(task\[0\]\),", "key=lambda task: (0,",
             ("tests/backends/cpu/test_kernel_cache.py", "-k", "longest")),
    Mutation("kernel cache: cached kernels load through numba's registry refresh",
             "backends/torch/cpu/cached_njit.py",
             r"        dispatcher\._cache = _CacheWithoutRegistries\(py_func\)\n", "",
             ("tests/backends/cpu/test_kernel_cache.py", "-k", "compiles_once")),
    Mutation("kernel cache: a cached kernel loaded without numba's runtime",
             "backends/torch/cpu/cached_njit.py", r"        start_runtime\(target_context\)\n",
             "", ("tests/backends/cpu/test_kernel_cache.py", "-k", "compiles_once")),
    Mutation("kernel cache: the runtime's functions compiled in every process",
             "backends/torch/cpu/cached_njit.py", r"    kept = _read_nrt\(path\)\n",
             "    kept = None\n", ("tests/backends/cpu/test_kernel_cache.py", "-k", "compiles_once")),
    Mutation("kernel cache: kept object code and bytecode loaded unchecked",
             "runtime/paths.py",
             r" or hashlib\.blake2b\(body, digest_size=32\)\.digest\(\) != data\[:32\]", "",
             ("tests/backends/cpu/test_kernel_cache.py", "-k", "damaged")),
    Mutation("kernel cache: a kernel module's source compiled in every process",
             "backends/torch/cpu/kernel_cache.py", r"    body = read_checked\(kept\)\n",
             "    body = None\n", ("tests/backends/cpu/test_kernel_cache.py", "-k", "compiles_once")),
    Mutation("kernel cache: a version in use not stamped when it loads",
             "backends/torch/cpu/kernel_cache.py", r"                os\.utime\(kept\)",
             "                pass", ("tests/backends/cpu/test_kernel_cache.py", "-k", "in_use")),
    Mutation("kernel cache: every other version of a type removed, however recent",
             "backends/torch/cpu/kernel_cache.py",
             r"if max\(f\.stat\(\)\.st_mtime for f in files\) < cutoff:", "if True:",
             ("tests/backends/cpu/test_kernel_cache.py", "-k", "unused_for")),
    Mutation("kernel cache: unused versions of every type removed",
             "backends/torch/cpu/kernel_cache.py", r'rf"diptych_qk_\{t\.name\}_',
             r'rf"diptych_qk_\\w+_', ("tests/backends/cpu/test_kernel_cache.py", "-k", "unused_for")),
    Mutation("kernel cache: a kernel in the cache announced as compiling",
             "backends/torch/cpu/kernel_cache.py", r'prefix = f"\{mod\.__name__\}\.',
             'prefix = f"guf-{mod.__name__}.',
             ("tests/backends/cpu/test_kernel_cache.py", "-k", "once")),
    # the int8-activation kernels (gemm_i8) and where they apply
    Mutation("CPU int8 linear: the weights' code offset left out",
             "backends/torch/cpu/kernel_source.py",
             r'acc = f"\(\{acc\} \+ np\.float32\(\{offset\}\) \* ss\)"', 'acc = f"({acc})"',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x")),
    Mutation("CPU int8 linear: the block minimums left out", "backends/torch/cpu/kernel_source.py",
             r'unit\.append\(f"y\{i\}\{sfx\} = fma\(c, dd \* ss, y\{i\}\{sfx\}\)"\)', "pass",
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x")),
    Mutation("CPU int8 linear: Q5's fifth bit of a group's first code lost",
             "backends/torch/cpu/llvm_bits.py", r"0x00204081", "0x00204080",
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q5")),
    Mutation("CPU int8 linear: Q5_K's fifth bit read for the next unit",
             "backends/torch/cpu/kernel_source.py",
             r'"qfield\(quad\(blk, \{qh\} \+ 4 \* g, r\), u, 1\), 4\)"',
             '"qfield(quad(blk, {qh} + 4 * g, r), (u + 1) & 7, 1), 4)"',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q5_K")),
    Mutation("CPU int8 linear: decode's one-pass slices read one column twice",
             "backends/torch/cpu/kernel_source.py",
             r'cols = \[\(f"_\{s\}", str\(16 \* s\)\)', 'cols = [(f"_{s}", str(16 * (s // 2)))',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q4_K")),
    Mutation("CPU int8 linear: a set of 16-element units misses the odd ones",
             "backends/torch/cpu/kernel_source.py",
             r'_SIXTEEN = \(4, "8 \* \(h >> 1\) \+ \(h & 1\) \+ 2 \* \{c\}"\)',
             '_SIXTEEN = (4, "8 * (h >> 1) + 2 * {c}")',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q6_K")),
    Mutation("CPU int8 linear: four byte planes not interleaved per row",
             "backends/torch/cpu/llvm_bits.py",
             r"\[16 \* i \+ l for l in range\(LANES\)\s+for i in range\(4\)\]",
             "[16 * i + l for i in range(4) for l in range(LANES)]",
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q8_0")),
    Mutation("CPU int8 linear: a block's second row reads the first row of x",
             "backends/torch/cpu/kernel_source.py",
             r'else f"m0 \+ min\(\{i\}, left - 1\)"', 'else f"m0 + min({i - 1}, left - 1)"',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounded_x and Q4_1")),
    Mutation("CPU int8 activations: scale of 1/128 of the largest value",
             "backends/torch/cpu/int8_activations.py",
             r"d\[m, b\] = amax / np\.float32\(127\.0\)", "d[m, b] = amax / np.float32(128.0)",
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "rounding or rounded_x")),
    Mutation("CPU int8 linear: training steps round their activations too",
             "backends/torch/cpu/qlinear.py",
             r" and torch\.is_inference_mode_enabled\(\) and path in _ROUNDED_X:",
             " and path in _ROUNDED_X:",
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "only_inference")),
    Mutation("CPU int8 linear: numerics 'exact' rounds too", "backends/torch/cpu/backend.py",
             r'self\._int8 = False  # numerics "fast"',
             'self._int8 = int8_activations.ENABLED  # numerics "fast"',
             ("tests/backends/cpu/test_gemm_i8.py", "-k", "only_inference")),
    Mutation("llama.cpp numerics: q8_1 sums not rounded to fp16",
             "backends/torch/cpu/llama_rounding.py",
             r"\(q\.sum\(-1\) \* d\.squeeze\(-1\)\)\.to\(torch\.float16\)\.to\(torch\.float32\)",
             "(q.sum(-1) * d.squeeze(-1))",
             ("tests/backends/cpu/test_llama_rounding.py", "-k", "q8_1")),
    Mutation("tool grammar: strict arguments unconstrained", "runtime/server/tool_grammar.py",
             r'if not forced and fn\["name"\] not in strict:', "if not forced:",
             ("tests/server/test_tool_grammar.py", "-k", "strict_tool_admits")),
    Mutation("LoRA linear: A's gradient without the scale", "backends/torch/cpu/lora_linear.py",
             r"g_xa = torch\.mm\(g, b\)\.mul_\(p\.scale\)", "g_xa = torch.mm(g, b)",
             ("tests/runtime/training/test_peft_oracle.py", "-k", "three_sgd")),
    Mutation("torch checkpoint: a recomputed layer's input gets no gradient",
             "backends/torch/recompute.py", r"ctx\.needs_input_grad\[1:\]",
             "(False,) + ctx.needs_input_grad[2:]",
             ("tests/runtime/training/test_torch_recompute.py",)),
    Mutation("training loss: the target's term left out of the logits' gradient",
             "backends/torch/log_likelihood.py", r"    g\.scatter_add_\(1, idx, wts\)\n", "",
             ("tests/runtime/training/test_peft_oracle.py", "-k", "three_sgd")),
    Mutation("training loss: softcap's derivative left out", "backends/torch/log_likelihood.py",
             r"g\.mul_\(1 - t \* t\)", "g.mul_(1)",
             ("tests/backends/test_torch_grad_ops.py", "-k", "log_likelihood")),
    Mutation("RMSNorm backward: the normalisation's own term dropped",
             "backends/torch/grad_ops.py", r"gx\.mul_\(rstd\)\.addcmul_\(x, coef, value=-1\)",
             "gx.mul_(rstd)", ("tests/runtime/training/test_peft_oracle.py", "-k", "three_sgd")),
    Mutation("RoPE backward: each half takes its own sine", "backends/torch/grad_ops.py",
             r"if sign > 0 else", "if True else",
             ("tests/runtime/training/test_peft_oracle.py", "-k", "three_sgd")),
    Mutation("SwiGLU backward: silu's derivative taken as the sigmoid",
             "backends/torch/grad_ops.py",
             r"d_gate\.addcmul_\(d_up, d_gate, value=-1\)\.add_\(d_up\)", "d_gate",
             ("tests/runtime/training/test_peft_oracle.py", "-k", "three_sgd")),
    # the TUI
    Mutation("TUI: regenerate is a no-op", "tui/screens/chat.py",
             r"^(    async def action_regenerate\(self\) -> None:\n)", r"\g<1>        return\n",
             ("tests/tui/test_chat_app.py", "-k", "regenerate")),
    Mutation("TUI: a narrow status bar leaves out the speeds first", "tui/widgets/status.py",
             r'DROPPED_FIRST = \("memory", "kv", "backend", "quant", "model", "speeds"\)',
             'DROPPED_FIRST = ("speeds", "memory", "kv", "backend", "quant", "model")',
             ("tests/tui/test_status.py",)),
    Mutation("TUI: notices over the status bar", "tui/app.tcss",
             r"(ChatScreen ToastRack \{\n)    dock: top;\n    align: right top;\n",
             r"\g<1>",
             ("tests/tui/test_loading.py", "-k", "load_bar")),
]


def tree_files(root: Path) -> list[str]:
    """The working tree's files: tracked, and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f and (root / f).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for rel in tree_files(root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)


def apply(mutation: Mutation, tree: Path) -> str | None:
    """Mutate the file in `tree`; the reason it could not be applied, or None."""
    path = tree / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(mutation.pattern, mutation.replacement, text, flags=re.MULTILINE)
    if n != 1:
        return f"pattern {mutation.pattern!r} matches {n} times in {mutation.path} (expected 1)"
    path.write_text(new, encoding="utf-8")
    return None


def environment(tree: Path, boot: Path) -> dict:
    env = dict(os.environ, DIPTYCH_MUTATION_TREE=str(tree))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(boot), env.get("PYTHONPATH")) if p)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_tests(tests: tuple, tree: Path, env: dict, timeout: float) -> tuple[str, float]:
    """("failed" | "passed" | "timeout" | "no tests", seconds) for the tests on the copy."""
    check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tree, env=env,
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"the copy is not what gets imported: {check.stderr or check.stdout}")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0
    seconds = time.monotonic() - t0
    if proc.returncode == 5:
        return "no tests", seconds
    if proc.returncode not in (0, 1):  # 2, 3, 4: interrupted, internal or usage error
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"pytest {' '.join(tests)} exited {proc.returncode}:\n{tail}")
    return ("failed" if proc.returncode == 1 else "passed"), seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this text")
    ap.add_argument("--baseline", action="store_true",
                    help="first run every selected mutation's tests on the unmutated copy")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:55} {m.path}")
        return 0 if args.list else 2

    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="diptych-mutation-") as tmp:
        boot, tree = Path(tmp) / "boot", Path(tmp) / "tree"
        boot.mkdir()
        (boot / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        copy_tree(ROOT, tree)
        env = environment(tree, boot)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                status, seconds = run_tests(tests, tree, env, args.timeout)
                print(f"baseline {' '.join(tests)}: {status} ({seconds:.0f} s)", flush=True)
                if status != "passed":
                    return 1
        for m in chosen:
            original = (tree / m.path).read_bytes() if (tree / m.path).is_file() else None
            error = apply(m, tree)
            if error:
                status, seconds = f"TARGET NOT FOUND: {error}", 0.0
            else:
                status, seconds = run_tests(m.tests, tree, env, args.timeout)
                (tree / m.path).write_bytes(original)
                status = {"failed": "caught"}.get(status, f"SURVIVED ({status})")
            ok &= status == "caught"
            rows.append((m.name, " ".join(m.tests), status, seconds))
            print(f"{m.name}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)

    widths = [max(len(r[i]) for r in rows + [("mutation", "tests", "result")]) for i in range(3)]
    header = ("mutation", "tests", "result", "seconds")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths + [7])))
    print("-+-".join("-" * w for w in widths + [7]))
    for name, tests, status, seconds in rows:
        print(" | ".join([name.ljust(widths[0]), tests.ljust(widths[1]), status.ljust(widths[2]),
                          f"{seconds:7.0f}"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
