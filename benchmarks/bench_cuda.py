"""The CUDA backend on a GPU: kernel bandwidth, path crossovers, decode/prefill speed against
transformers, long-context attention, graph vs eager. One process, one command:

    python benchmarks/bench_cuda.py                      # every section
    python benchmarks/bench_cuda.py gemv crossover       # some of them
    python benchmarks/bench_cuda.py decode --models 135m 7b --tokens 128

Sections (each prints a Markdown table; every figure is a ratio to something measured in
the same run):
  gemv       fused dequant+GEMV (M=1) per type on an LM head and 7B FFN shapes: GB/s of
             weight bytes vs the device copy bandwidth (target >= 70% on large shapes);
             bf16 cuBLAS on the dense weight and torch's int4 `_weight_int4pack_mm` beside it;
             with --sweep, the best (BLOCK_N, BLOCK_K, warps) per type.
  crossover  microseconds per call by rows M: GEMV, fused GEMM, dequantize+cuBLAS, dense
             bf16 -> the GEMV_MAX_M and DEQUANT_MM_MIN_M thresholds of kernels/qmatmul.py.
  decode     batch-1 greedy decode tok/s, graph-captured and eager, for models of the real
             shapes and quant mixes with random weights (speed does not depend on values),
             vs the bandwidth floor (weight bytes per token / copy bandwidth) and vs
             transformers (bf16, static cache, torch.compile) on the same shapes.
  prefill    prompt tok/s at 512 and 2048 tokens vs transformers (bf16, eager SDPA).
  context    decode tok/s after an 8k-token prompt: full cache vs a 4096 sliding window.
  verify     speculative decoding's verify steps: ms of a step of width w = 1..16 (a decode,
             then drafts of w - 1 tokens), captured as a CUDA graph and eager.
  train      LoRA fine-tuning tokens/s and peak device memory (rank 8 on all seven
             linears, gradient checkpointing, AdamW) on the quantized base, beside
             transformers + PEFT on the same shape in bf16 (bitsandbytes' 4-bit QLoRA is not
             a dependency); --batch, --seq, --steps.

Weights are random GGUF-typed planes made on the device (`RandomWeights`), so no model file
has to reach the GPU machine. Needs torch with CUDA, triton, transformers (and peft for
train). `--dry-run` runs the chosen sections on the CPU under Triton's interpreter at a tiny
shape (a check of this script, not a measurement; scripts/gpu_checks.sh runs it first).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:   # Triton reads this as its kernels are decorated: before they are imported
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from diptych.backends.torch.cuda.backend import CudaBackend  # noqa: E402
from diptych.backends.torch.cuda.kernels import qmatmul as qm  # noqa: E402
from diptych.backends.torch.cuda.kernels.layout import KERNEL_TYPES, plane_shapes  # noqa: E402
from diptych.backends.torch.cuda.kernels.weight import QuantWeight  # noqa: E402
from diptych.inference.engine import Engine  # noqa: E402
from diptych.load_plan import LoadPlan  # noqa: E402
from diptych.quant import QuantTensor  # noqa: E402
from diptych.quant.formats import IQ4_NL_CODEBOOK  # noqa: E402

DEV = "cpu" if DRY_RUN else "cuda"


def bench(fn, reps: int = 50) -> float:
    """Median seconds of fn() (CUDA events, after warm-up); a dry run's one call."""
    if DRY_RUN:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=reps, return_mode="median") / 1e3


def sync() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def peak_mib() -> float:
    """The device's peak allocated MiB since the last reset_peak() (NaN in a dry run)."""
    return float("nan") if DRY_RUN else torch.cuda.max_memory_allocated() / 2**20


def reset_peak() -> None:
    if not DRY_RUN:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write) on a 1 GiB buffer."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src))


def random_weight(ggml_type: T, n: int, k: int, name: str = "w") -> QuantWeight:
    """Random planes of a GGUF type on the device; scales small and finite."""
    planes = {}
    for key, (shape, dtype) in plane_shapes(ggml_type, n, k).items():
        if dtype == np.float16:
            planes[key] = (torch.rand(shape, device=DEV) * 2e-3 + 1e-4).half()
        else:
            planes[key] = torch.randint(0, 256, shape, dtype=torch.uint8,
                                        device=DEV).view(getattr(torch, dtype.name))
    lut = torch.from_numpy(IQ4_NL_CODEBOOK.astype(np.float32)).to(DEV)
    return QuantWeight(name, ggml_type, (n, k), planes, lut)


class RandomWeights(CudaBackend):
    """A CudaBackend whose prepare() makes random planes of the tensor's type and shape."""

    def __init__(self):
        super().__init__(DEV)

    def prepare(self, qt: QuantTensor):
        if qt.ggml_type in KERNEL_TYPES:
            return random_weight(qt.ggml_type, *qt.shape, name=qt.name)
        return super().prepare(qt)


# -- model shapes and quant mixes -------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    arch: str
    n_layers: int
    d: int
    ff: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    types: dict  # tensor kind -> GGUF type: embd, out, qko (q, k, o), v, gate_up, down
    theta: float = 10000.0


SHAPES = {  # the quant mixes of the real files (K-quants fall back where K % 256 != 0)
    "135m": Shape("llama", 30, 576, 1536, 9, 3, 49152, True,
                  dict(embd=T.Q8_0, qko=T.Q4_1, v=T.Q4_1, gate_up=T.Q4_1, down=T.Q4_1)),
    "0.5b": Shape("qwen2", 24, 896, 4864, 14, 2, 151936, True,
                  dict(embd=T.Q8_0, qko=T.Q5_0, v=T.Q8_0, gate_up=T.Q5_0, down=T.Q6_K), 1e6),
    "1.5b": Shape("qwen2", 28, 1536, 8960, 12, 2, 151936, True,
                  dict(embd=T.Q6_K, qko=T.Q4_K, v=T.Q6_K, gate_up=T.Q4_K, down=T.Q6_K), 1e6),
    "7b": Shape("llama", 32, 4096, 11008, 32, 32, 32000, False,
                dict(embd=T.Q4_K, out=T.Q6_K, qko=T.Q4_K, v=T.Q6_K, gate_up=T.Q4_K,
                     down=T.Q6_K)),
}
# --dry-run's one shape: every path of the script in seconds under the interpreter
TINY = Shape("qwen2", 2, 256, 512, 4, 2, 512, True,
             dict(embd=T.Q8_0, qko=T.Q4_K, v=T.Q6_K, gate_up=T.Q4_K, down=T.Q6_K))


def _placeholder(name: str, ggml_type: T, shape: tuple) -> QuantTensor:
    """A tensor whose bytes are never read (RandomWeights.prepare makes the planes)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type]
    row = np.zeros(shape[-1] // block * size, np.uint8)
    return QuantTensor(name, ggml_type, shape, np.broadcast_to(row, (shape[0], row.size)))


def _vector(name: str, n: int, value: float = 1.0) -> QuantTensor:
    data = np.full(n, value, np.float32).view(np.uint8).reshape(1, -1)
    return QuantTensor(name, T.F32, (n,), data)


def synthetic_model(s: Shape, window: int = 0):
    """(metadata, tensors) of a GGUF model of shape `s` (tensor bytes: placeholders)."""
    hd = s.d // s.heads
    a = s.arch
    meta = {"general.architecture": a, f"{a}.block_count": s.n_layers,
            f"{a}.embedding_length": s.d, f"{a}.feed_forward_length": s.ff,
            f"{a}.attention.head_count": s.heads, f"{a}.attention.head_count_kv": s.kv_heads,
            f"{a}.context_length": 32768, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{a}.rope.freq_base": s.theta}
    if window:
        meta[f"{a}.attention.sliding_window"] = window
    t = s.types
    tensors = {"token_embd.weight": _placeholder("token_embd.weight", t["embd"], (s.vocab, s.d)),
               "output_norm.weight": _vector("output_norm.weight", s.d)}
    if not s.tied:
        tensors["output.weight"] = _placeholder("output.weight", t["out"], (s.vocab, s.d))
    kv = s.kv_heads * hd
    for i in range(s.n_layers):
        p = f"blk.{i}."
        for name, kind, shape in (("attn_q", "qko", (s.d, s.d)), ("attn_k", "qko", (kv, s.d)),
                                  ("attn_v", "v", (kv, s.d)), ("attn_output", "qko", (s.d, s.d)),
                                  ("ffn_gate", "gate_up", (s.ff, s.d)),
                                  ("ffn_up", "gate_up", (s.ff, s.d)),
                                  ("ffn_down", "down", (s.d, s.ff))):
            tensors[p + name + ".weight"] = _placeholder(p + name + ".weight", t[kind], shape)
        for name in ("attn_norm", "ffn_norm"):
            tensors[p + name + ".weight"] = _vector(p + name + ".weight", s.d)
        if a == "qwen2":
            for name, n in (("attn_q", s.d), ("attn_k", kv), ("attn_v", kv)):
                tensors[p + name + ".bias"] = _vector(p + name + ".bias", n, 0.0)
    return meta, tensors


def build_engine(s: Shape, n_ctx: int, n_batch: int, window: int = 0) -> Engine:
    meta, tensors = synthetic_model(s, window)
    source = SimpleNamespace(metadata=meta, tensors=tensors)
    return LoadPlan.from_source(source, RandomWeights(), n_ctx=n_ctx, n_batch=n_batch).engine()


def bytes_per_token(eng: Engine) -> int:
    """Weight bytes a decode step reads: every matrix, except the embedding table unless it
    is also the output head (one row of it is read otherwise)."""
    w = eng.weights
    total = sum(eng.backend.weight_bytes(m) for name, m in w.linears() if name != "token_embd")
    return total + (eng.backend.weight_bytes(w.tok_embd) if w.output is w.tok_embd else 0)


def warmed_step(eng: Engine, prompt: int, width: int, captured: bool):
    """(run, args): the step of `width` tokens after a `prompt`-token prefill, as
    `Sequence.step` runs it (a decode, or the verification of width - 1 drafted tokens),
    captured as a CUDA graph or eager, warmed up; run(*args) runs it again."""
    eng.reset()
    ids = np.random.default_rng(0).integers(0, eng.cfg.vocab_size, prompt + width).tolist()
    eng.eval(ids[:prompt])
    seq = eng.main
    run = eng.backend.compile_step(seq._run) if captured else seq._run
    # the step's device inputs: tokens, positions and the full cache's slots (= positions)
    args = seq._inputs(ids[prompt:])
    for _ in range(1 if DRY_RUN else 3):  # warm-up (and capture)
        run(*args)
    return run, args


def decode_rate(eng: Engine, n_tokens: int, captured: bool, prompt: int = 16) -> float:
    """Greedy decode tok/s after a `prompt`-token prefill; tokens stay on the device."""
    run, args = warmed_step(eng, prompt, 1, captured)
    _, tok, pos, slots = args[:4]
    sync()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = run(*args)
        tok.copy_(logits[:, -1].argmax(-1).view(1, 1))
        pos += 1
        slots += 1
    sync()
    return n_tokens / (time.perf_counter() - t0)


def hf_model(s: Shape):
    import transformers

    cls = {"llama": "Llama", "qwen2": "Qwen2"}[s.arch]
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ff,
        num_hidden_layers=s.n_layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default",
                                                        "rope_theta": s.theta})
    with torch.device(DEV):
        model = getattr(transformers, cls + "ForCausalLM")(cfg).to(torch.bfloat16).eval()
    return model


def hf_decode_rate(s: Shape, n_tokens: int) -> float:
    """transformers, bf16, static cache, torch.compile(mode="reduce-overhead")."""
    model = hf_model(s)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, s.vocab, (1, 16), device=DEV)

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(n_tokens + 32)
    gen(n_tokens + 32)  # compiled and captured by now
    dt = gen(n_tokens + 32) - gen(32)  # the difference cancels prefill and setup
    del model
    torch.cuda.empty_cache()
    return n_tokens / dt


def _guarded(fn, *args, **kwargs) -> float:
    """The peer's figure, or NaN with the reason printed: one failing peer does not stop
    the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # transformers/compile versions vary on the GPU machine
        print(f"  (transformers failed: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return float("nan")


# -- sections ---------------------------------------------------------------------------

GEMV_SHAPES = [("LM head 151936x896", 151936, 896), ("LM head 32000x4096", 32000, 4096),
               ("7B ffn up 11008x4096", 11008, 4096), ("7B ffn down 4096x11008", 4096, 11008)]


def _int4pack_seconds(n: int, k: int):
    """torch's int4 weight-only GEMV (group 32, bf16 scales/zeros), or None if unsupported."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(k // 32, n, 2, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        return bench(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 32, sz))
    except (RuntimeError, AttributeError) as e:
        print(f"  (int4pack unavailable: {str(e).splitlines()[0][:80]})")
        return None


def section_gemv(copy_bw: float, sweep: bool) -> None:
    print(f"\n### Quantized GEMV (M=1), GB/s of weight bytes and % of copy bandwidth "
          f"({copy_bw / 1e9:.0f} GB/s)\n")
    print("| shape | type | GB/s | % copy | best config (--sweep) |")
    print("|---|---|---|---|---|")
    for label, n, k in GEMV_SHAPES:
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        dense = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        t = bench(lambda: torch.nn.functional.linear(x, dense))
        print(f"| {label} | bf16 cuBLAS | {2 * n * k / t / 1e9:.0f} | "
              f"{200 * n * k / t / copy_bw:.0f}% | |")
        del dense
        t4 = _int4pack_seconds(n, k)
        if t4:
            nbytes = n * k // 2 + n * k // 32 * 4
            print(f"| {label} | torch int4pack g32 | {nbytes / t4 / 1e9:.0f} | "
                  f"{100 * nbytes / t4 / copy_bw:.0f}% | |")
        for ggml_type, info in KERNEL_TYPES.items():
            if k % info.block:
                continue
            w = random_weight(ggml_type, n, k)
            t = bench(lambda: qm.gemv(x, w))
            best = ""
            if sweep:
                runs = {(bn, bk, nw): bench(lambda: qm.gemv(x, w, block_n=bn, block_k=bk,
                                                            num_warps=nw))
                        for bn in (4, 8, 16, 32) for bk in (128, 256, 512) for nw in (2, 4, 8)}
                cfg, tb = min(runs.items(), key=lambda kv: kv[1])
                best = f"{cfg}: {100 * w.nbytes / tb / copy_bw:.0f}%"
            print(f"| {label} | {ggml_type.name} | {w.nbytes / t / 1e9:.0f} | "
                  f"{100 * w.nbytes / t / copy_bw:.0f}% | {best} |")
            del w


def section_crossover() -> None:
    print("\n### Quantized matmul paths by rows M (microseconds per call)\n")
    print("| weight | M | GEMV | fused GEMM | dequant + cuBLAS | dense bf16 |")
    print("|---|---|---|---|---|---|")
    for ggml_type, n, k in ((T.Q4_0, 11008, 4096), (T.Q4_K, 11008, 4096),
                            (T.Q6_K, 4096, 11008)):
        w = random_weight(ggml_type, n, k)
        dense = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            cells = [f"{bench(lambda: qm.gemv(x, w)) * 1e6:.0f}" if m <= 16 else "-",
                     f"{bench(lambda: qm.gemm(x, w)) * 1e6:.0f}",
                     f"{bench(lambda: qm.dequant_matmul(x, w)) * 1e6:.0f}",
                     f"{bench(lambda: x @ dense.T) * 1e6:.0f}"]
            print(f"| {ggml_type.name} {n}x{k} | {m} | " + " | ".join(cells) + " |")
        del w, dense


def section_decode(models, n_tokens: int, copy_bw: float, with_hf: bool) -> None:
    print(f"\n### Decode, batch 1, {n_tokens} greedy tokens after a 16-token prompt\n")
    print("| model | MiB/token | graph tok/s | eager tok/s | graph/eager | floor tok/s | "
          "% floor | transformers tok/s | vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in models:
        eng = build_engine(s, 2048, 512)
        per_tok = bytes_per_token(eng)
        graph = decode_rate(eng, n_tokens, captured=True)
        eager = decode_rate(eng, n_tokens, captured=False)
        floor = copy_bw / per_tok
        del eng
        torch.cuda.empty_cache()
        hf = _guarded(hf_decode_rate, s, n_tokens) if with_hf else float("nan")
        print(f"| {name} | {per_tok / 2**20:.0f} | {graph:.0f} | {eager:.0f} | "
              f"{graph / eager:.1f}x | {floor:.0f} | {100 * graph / floor:.0f}% | {hf:.0f} | "
              f"{graph / hf:.2f}x |")


def section_prefill(models, with_hf: bool) -> None:
    print("\n### Prefill tok/s (one chunk)\n")
    print("| model | tokens | diptych tok/s | transformers bf16 tok/s | ratio |")
    print("|---|---|---|---|---|")
    for name, s in models:
        hf = _guarded(hf_model, s) if with_hf else None
        hf = None if isinstance(hf, float) else hf
        for n in (512, 2048):
            eng = build_engine(s, n + 16, n)
            ids = np.random.default_rng(1).integers(0, s.vocab, n).tolist()

            def ours():
                eng.reset()
                eng.eval(ids)

            t = bench(ours, reps=200)
            th = float("nan")
            if hf is not None:
                x = torch.tensor([ids], device=DEV)
                with torch.no_grad():
                    th = _guarded(bench, lambda: hf(x, logits_to_keep=1), reps=200)
            print(f"| {name} | {n} | {n / t:.0f} | {n / th:.0f} | {th / t:.2f}x |")
            del eng
        del hf
        torch.cuda.empty_cache()


def section_context(n_tokens: int) -> None:
    print("\n### Decode after an 8000-token prompt: full cache vs sliding window 4096 "
          "(0.5b shape, graph)\n")
    print("| cache | tok/s |")
    print("|---|---|")
    for label, window in (("full", 0), ("sliding 4096 (ring)", 4096)):
        eng = build_engine(SHAPES["0.5b"], 8192 + 256, 512, window)
        print(f"| {label} | {decode_rate(eng, n_tokens, captured=True, prompt=8000):.0f} |")
        del eng
        torch.cuda.empty_cache()


def step_seconds(eng: Engine, width: int, captured: bool) -> float:
    """Seconds of one step of `width` tokens after a 16-token prompt (warmed_step)."""
    run, args = warmed_step(eng, 16, width, captured)
    return bench(lambda: run(*args))


def section_verify(models) -> None:
    print("\n### Verify steps of width w (speculative decoding), ms per step\n")
    print("| model | w | CUDA graph ms | x width 1 | eager ms | eager / graph |")
    print("|---|---|---|---|---|---|")
    for name, s in models:
        eng = build_engine(s, 64 if DRY_RUN else 2048, 512)
        first = None
        for w in (1, 3) if DRY_RUN else (1, 2, 4, 8, 16):
            graph = step_seconds(eng, w, captured=True)
            eager = step_seconds(eng, w, captured=False)
            first = first or graph
            print(f"| {name} | {w} | {graph * 1e3:.2f} | {graph / first:.2f} | "
                  f"{eager * 1e3:.2f} | {eager / graph:.1f}x |")
        del eng
        reset_peak()


LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_rate(s: Shape, batch: int, seq: int, steps: int) -> tuple[float, float]:
    """(training tokens/s, peak device MiB) of diptych's LoRA on the quantized base: rank 8
    on all seven linears, gradient checkpointing, AdamW; the first update is a warm-up."""
    from diptych.training.data import Example
    from diptych.training.loop import Trainer
    from diptych.training.options import TrainOptions

    rng = np.random.default_rng(0)
    data = [Example(tuple(int(i) for i in rng.integers(0, s.vocab, seq)), (True,) * seq)
            for _ in range(batch * (steps + 1))]
    opts = TrainOptions(rank=8, alpha=16, batch_size=batch, max_seq_len=seq,
                        grad_checkpointing=True, steps=steps + 1)
    reset_peak()
    eng = build_engine(s, 16, 16)   # training runs without the KV cache
    be = eng.backend
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(be, eng.cfg, eng.weights, data, opts, out)
        for update in range(steps + 1):
            if update == 1:
                sync()
                t0 = time.perf_counter()
            _, grads, _ = trainer.gradients(update)
            trainer.params, trainer.moments = be.adamw(
                trainer.params, grads, trainer.moments, update + 1, 1e-4, (0.9, 0.999), 1e-8,
                0.0)
        sync()
        rate = steps * batch * (seq - 1) / (time.perf_counter() - t0)
    del trainer, eng
    return rate, peak_mib()


def peft_train_rate(s: Shape, batch: int, seq: int, steps: int) -> tuple[float, float]:
    """The same for transformers + PEFT on the shape's bf16 dense weights."""
    from peft import LoraConfig, get_peft_model

    reset_peak()
    model = hf_model(s).train()
    model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=LORA_MODULES))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    for update in range(steps + 1):
        if update == 1:
            sync()
            t0 = time.perf_counter()
        x = torch.from_numpy(rng.integers(0, s.vocab, (batch, seq))).to(DEV)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    rate = steps * batch * (seq - 1) / (time.perf_counter() - t0)
    del model, opt
    return rate, peak_mib()


def section_train(models, batch: int, seq: int, steps: int) -> None:
    print(f"\n### LoRA fine-tuning, batch {batch} x {seq} tokens, rank 8 on all seven "
          f"linears, gradient checkpointing, {steps} timed updates\n")
    print("| model | diptych tok/s | peak MiB | transformers + PEFT (bf16) tok/s | peak MiB | "
          "speed ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, s in models:
        ours, ours_mib = train_rate(s, batch, seq, steps)
        peft = _guarded(peft_train_rate, s, batch, seq, steps)
        peft, peft_mib = peft if isinstance(peft, tuple) else (peft, float("nan"))
        print(f"| {name} | {ours:.0f} | {ours_mib:.0f} | {peft:.0f} | {peft_mib:.0f} | "
              f"{ours / peft:.2f}x | {ours_mib / peft_mib:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sections", nargs="*",
                    default=["gemv", "crossover", "decode", "prefill", "context", "verify",
                             "train"])
    ap.add_argument("--models", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="GEMV: search block sizes per type")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    ap.add_argument("--batch", type=int, default=4, help="train: sequences per update")
    ap.add_argument("--seq", type=int, default=512, help="train: tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="train: timed updates")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU under Triton's interpreter, at a tiny shape")
    args = ap.parse_args()
    if DRY_RUN:
        models = [("tiny", TINY)]
        args.batch, args.seq, args.steps = 2, 32, 1
        print("dry run: the CPU, Triton's interpreter, a tiny shape; no figure means anything")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_cuda.py needs a CUDA device")
        models = [(name, SHAPES[name]) for name in args.models]
        print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · "
              f"triton {__import__('triton').__version__} · {time.strftime('%Y-%m-%d')}")
    copy_bw = None
    if {"gemv", "decode"} & set(args.sections):
        copy_bw = copy_bandwidth()
        print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    for sec in args.sections:
        if sec == "gemv":
            section_gemv(copy_bw, args.sweep)
        elif sec == "crossover":
            section_crossover()
        elif sec == "decode":
            section_decode(models, args.tokens, copy_bw, not args.no_hf)
        elif sec == "prefill":
            section_prefill(models, not args.no_hf)
        elif sec == "context":
            section_context(args.tokens)
        elif sec == "verify":
            section_verify(models)
        elif sec == "train":
            section_train(models, args.batch, args.seq, args.steps)
        else:
            raise SystemExit(f"unknown section {sec!r}")


if __name__ == "__main__":
    main()
