"""The `diptych` command line."""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

from diptych.errors import DiptychError, ModelFileError


def _load(args):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.api import load

    with Progress(TextColumn("loading"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("load", total=None)

        def progress(done, total):
            bar.update(task, completed=done, total=total)

        return load(args.model, backend=args.backend, n_ctx=args.n_ctx, progress=progress)


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repetition_penalty": args.repeat_penalty, "seed": args.seed}


def _print_stream(pieces) -> object:
    """Write pieces to stdout as they come; returns the last piece's timings."""
    last = None
    for piece in pieces:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        last = piece
    sys.stdout.write("\n")
    return last.timings if last else None


def _report(timings) -> None:
    if timings:
        print(f"[{timings.prompt_tokens} prompt tokens, {timings.prefill_tps:.1f} tok/s; "
              f"{timings.generated_tokens} generated, {timings.decode_tps:.1f} tok/s]",
              file=sys.stderr)


def cmd_run(args) -> int:
    if args.prompt is None:
        args.model, args.prompt = None, args.model
    model = _load(args)
    kw = dict(max_tokens=args.max_tokens, stop=args.stop, **_sampling(args))
    if args.raw or not model.tokenizer.chat_template:
        pieces = model.stream(args.prompt, **kw)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        pieces = model.chat_stream(messages + [{"role": "user", "content": args.prompt}], **kw)
    try:
        _report(_print_stream(pieces))
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    return 0


def cmd_chat(args) -> int:
    """The Textual chat app; the model and options are its starting settings."""
    from pathlib import Path

    from diptych.backends import resolve
    from diptych.tui import run_app
    from diptych.tui.chat_settings import ChatSettings

    from diptych.sources.default_model import default_model_path

    settings = ChatSettings(system=args.system or "", max_tokens=args.max_tokens,
                            **_sampling(args))
    settings.validate()
    resolve(args.backend)
    if args.model is not None and not Path(args.model).exists():
        raise ModelFileError(f"{args.model}: no such file or folder")
    # fetch the default model (with its progress on stderr) before the screen is taken over
    source = args.model if args.model is not None else default_model_path()
    run_app(source, backend=args.backend, n_ctx=args.n_ctx, settings=settings)
    return 0


def tensor_kind(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q.weight'."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blk" else name


def smallest_matrix_per_type(tensors) -> dict:
    """One 2-D tensor of each GGML type (the smallest), to show how a backend stores it."""
    out = {}
    for t in tensors.values():
        if len(t.shape) == 2 and (t.type_name not in out or t.nbytes < out[t.type_name].nbytes):
            out[t.type_name] = t
    return out


def cache_kind(cfg) -> str:
    if cfg.mla:
        return (f"MLA latent cache, {cfg.mla.kv_lora_rank} + {cfg.mla.qk_rope} values per "
                "token and layer")
    n_window = sum(cfg.is_window_layer(i) for i in range(cfg.n_layers))
    if n_window:
        return (f"{cfg.n_layers - n_window} full layers + {n_window} sliding-window layers "
                f"of {cfg.sliding_window} tokens")
    return "full K/V cache"


def cmd_info(args) -> int:
    from diptych.model.families.gguf import config_from_gguf
    from diptych.inference.memory import activation_bytes, choose_n_ctx
    from diptych.inference.cache import KVCache, bytes_per_token
    from diptych.sources.hf_folder import open_source

    from diptych.backends import select

    from diptych.sources.default_model import default_model_path

    path = args.model or default_model_path()
    f = open_source(path)
    cfg = config_from_gguf(f.metadata, {n: t.shape for n, t in f.tensors.items()})
    n_params = sum(t.n_elements for t in f.tensors.values())
    weight_bytes = sum(t.nbytes for t in f.tensors.values())
    kinds: dict[str, Counter] = defaultdict(Counter)
    for name, t in f.tensors.items():
        kinds[tensor_kind(name)][t.type_name] += 1
    be = select(args.backend)
    kv_el = be.kv_bytes_per_element()
    n_ctx = choose_n_ctx(cfg, args.n_ctx, kv_el)
    kv = KVCache.bytes_needed(cfg, n_ctx, kv_el, 256)
    per_token, ring = bytes_per_token(cfg, kv_el)
    mib = 1 << 20
    print(f"file            {path}")
    print(f"name            {cfg.name}")
    print(f"architecture    {cfg.arch}")
    print(f"parameters      {n_params / 1e6:.1f} M")
    print(f"layers          {cfg.n_layers} (d_model {cfg.d_model}, ffn {cfg.d_ff}, heads "
          f"{cfg.n_heads}/{cfg.n_kv_heads} kv, head_dim {cfg.head_dim})")
    print(f"vocabulary      {cfg.vocab_size}")
    print(f"context length  {cfg.context_length} (trained)")
    print("tensor types:")
    for kind, counts in sorted(kinds.items()):
        print(f"  {kind:24s} " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
    print(f"layouts on the {be.describe()} backend:")
    for type_name, qt in sorted(smallest_matrix_per_type(f.tensors).items()):
        print(f"  {type_name:8s} {be.weight_layout(be.prepare(qt))}")
    print(f"memory estimate ({be.describe()}, n_ctx {n_ctx}):")
    print(f"  weights       {weight_bytes / mib:9.1f} MiB (kept quantized)")
    print(f"  KV cache      {kv / mib:9.1f} MiB ({cache_kind(cfg)}: {per_token} bytes/token"
          + (f", plus {ring / mib:.1f} MiB of sliding-window rings" if ring else "") + ")")
    print(f"  working       {activation_bytes(cfg, 256) / mib:9.1f} MiB")
    print(f"  total         {(weight_bytes + kv + activation_bytes(cfg, 256)) / mib:9.1f} MiB")
    return 0


def cmd_bench(args) -> int:
    from .bench import measure_speed, peak_rss_bytes, random_prompt

    model = _load(args)
    prompt = random_prompt(model.config.vocab_size, args.prompt_tokens)
    prefill_tps, decode_tps = measure_speed(model, prompt, args.gen_tokens)
    print(f"model    {model.config.name} ({model.path.name}) on {model.backend.describe()}")
    print(f"prefill  {prefill_tps:8.1f} tok/s ({args.prompt_tokens} tokens)")
    print(f"decode   {decode_tps:8.1f} tok/s ({args.gen_tokens} tokens after the prompt)")
    print(f"peak RSS {peak_rss_bytes() / (1 << 20):8.1f} MiB")
    return 0


def cmd_convert(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.sources.convert import convert

    with Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("convert", total=None)
        out = convert(args.folder, args.out, args.type,
                      lambda done, total: bar.update(task, completed=done, total=total))
    print(f"wrote {out} ({out.stat().st_size / (1 << 20):.1f} MiB, {args.type.upper()})")
    return 0


def cmd_quantize(args) -> int:
    import warnings

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.sources.quantize import quantize

    with Progress(TextColumn("quantizing {task.description:<36}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as bar, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"diptych: warning: {msg}",
                                                          file=sys.stderr)
        task = bar.add_task("", total=None)
        out = quantize(args.input, args.out, args.type, allow_requantize=args.allow_requantize,
                       progress=lambda name, done, total: bar.update(
                           task, description=name, completed=done, total=total))
    print(f"wrote {out} ({out.stat().st_size / (1 << 20):.1f} MiB, {args.type.upper()})")
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from diptych.api import load
    from diptych.inference.perplexity import perplexity

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{args.text}: cannot read the text ({exc})") from None
    model = load(args.model, backend=args.backend, n_ctx=args.ctx)
    base = load(args.kl_divergence, backend=args.backend, n_ctx=args.ctx) \
        if args.kl_divergence else None
    with Progress(TextColumn("scoring chunks"), BarColumn(), MofNCompleteColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("ppl", total=None)
        result = perplexity(model, model.tokenize(text, special=False), args.ctx, base,
                            lambda done, total: bar.update(task, completed=done, total=total))
    print(result.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diptych", description="Run GGUF language models locally.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(sp, model_help="a .gguf file or a Hugging Face safetensors folder (default: "
                   "the embedded SmolLM2-135M-Instruct)"):
        sp.add_argument("model", nargs="?", help=model_help)
        sp.add_argument("--backend", default="auto",
                        help="auto | torch | mlx (default: auto: mlx on Apple silicon, else "
                             "torch, on CUDA where a GPU is present)")
        sp.add_argument("--n-ctx", type=int, default=None,
                        help="context size in tokens (default: the model's, capped at 8192)")

    def sampling_opts(sp):
        sp.add_argument("--max-tokens", type=int, default=512)
        sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        sp.add_argument("--top-k", type=int, default=40)
        sp.add_argument("--top-p", type=float, default=0.95)
        sp.add_argument("--min-p", type=float, default=0.05)
        sp.add_argument("--repeat-penalty", type=float, default=1.0)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--system", default=None, help="a system prompt")

    sp = sub.add_parser("chat", help="chat in the terminal (full-screen app)")
    model_opts(sp)
    sampling_opts(sp)
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("run", help="answer one prompt, streamed to stdout",
                        usage="diptych run [MODEL] PROMPT [options]")
    model_opts(sp)
    sp.add_argument("prompt", nargs="?", help="the prompt")
    sampling_opts(sp)
    sp.add_argument("--raw", action="store_true",
                    help="plain completion of the prompt, without the chat template")
    sp.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("info", help="describe a model file and its memory needs")
    sp.add_argument("model", nargs="?", help="a .gguf file or a Hugging Face folder "
                    "(default: the embedded model)")
    sp.add_argument("--n-ctx", type=int, default=None)
    sp.add_argument("--backend", default="auto", help="whose weight layouts to show")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("bench", help="measure prefill and decode speed and peak memory")
    model_opts(sp)
    sp.add_argument("--prompt-tokens", type=int, default=256)
    sp.add_argument("--gen-tokens", type=int, default=128)
    sp.set_defaults(func=cmd_bench)

    from diptych.sources.convert import CONVERT_TYPES

    sp = sub.add_parser("convert", help="write a Hugging Face safetensors folder as GGUF")
    sp.add_argument("folder", help="a folder with config.json, *.safetensors and the tokenizer")
    sp.add_argument("out", help="the .gguf file to write")
    sp.add_argument("--type", default="F16", type=str.upper, choices=CONVERT_TYPES,
                    help="type of the weight matrices (default: F16); vectors stay F32")
    sp.set_defaults(func=cmd_convert)

    from diptych.sources.quantize import QUANTIZE_MIXES

    sp = sub.add_parser("quantize",
                        help="write a model as GGUF in a quantization mix (Q4_K_M, ...)")
    sp.add_argument("input",
                    help="an F32/F16/BF16 .gguf file or a Hugging Face safetensors folder")
    sp.add_argument("out", help="the .gguf file to write")
    sp.add_argument("--type", default="Q4_K_M", type=str.upper, choices=QUANTIZE_MIXES,
                    help="the mix, as llama.cpp names it (default: Q4_K_M)")
    sp.add_argument("--allow-requantize", action="store_true",
                    help="accept a quantized input (lossy: both roundings add up)")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("perplexity", help="perplexity of a model on a text (llama-perplexity's "
                        "chunked method), and KL divergence against a base model")
    sp.add_argument("model", help="a .gguf file or a Hugging Face safetensors folder")
    sp.add_argument("text", help="a UTF-8 text file")
    sp.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: 512)")
    sp.add_argument("--kl-divergence", metavar="BASE", default=None,
                    help="a base model (same vocabulary): also report KL(base || model) and "
                         "top-1 agreement")
    sp.add_argument("--backend", default="auto")
    sp.set_defaults(func=cmd_perplexity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiptychError as exc:
        print(f"diptych: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndiptych: interrupted", file=sys.stderr)
        return 130
