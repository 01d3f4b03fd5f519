"""The `diptych` command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

from diptych import __version__
from diptych.errors import DiptychError, ModelFileError
from diptych.inference.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from diptych.inference.speculative import DEFAULT_DRAFT_MAX, DEFAULT_LOOKUP_NGRAM
from diptych.model.display_name import display_name


class UsageError(Exception):
    """A command line that cannot mean anything: reported like argparse's errors (exit 2)."""


def _load(args):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.api import load
    from diptych.sources.default_model import default_model_path
    from diptych.sources.hub import local_path

    # a download (a Hub model, the default model) draws its own bar: finish it before this one
    source = local_path(args.model) if args.model is not None else default_model_path()
    with Progress(TextColumn("loading"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("load", total=None)

        def progress(done, total):
            bar.update(task, completed=done, total=total)

        model = load(source, backend=args.backend, device=args.device, n_ctx=args.n_ctx,
                     progress=progress, adapter=getattr(args, "adapter", None),
                     draft=getattr(args, "draft", None),
                     draft_max=getattr(args, "draft_max", DEFAULT_DRAFT_MAX),
                     numerics="fast" if getattr(args, "fast", False) else "exact")
    model.backend.on_first_use(_say_first_use)
    return model


_first_use_started: list[float] = []


def _say_first_use(what: str | None) -> None:
    """The backend's first-use listener: kernels compiled and speeds measured on first use
    are announced on stderr, not waited for in silence (the chat TUI shows them in its
    status bar instead)."""
    import time

    if what is not None:
        _first_use_started.append(time.perf_counter())
        print(f"{what} (once: later runs read it from the cache)...", file=sys.stderr,
              flush=True)
    elif _first_use_started:
        print(f"  done in {time.perf_counter() - _first_use_started.pop():.1f} s",
              file=sys.stderr, flush=True)


def _sampling(args) -> dict:
    """The sampling options given; None (not given) leaves the model's default."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repetition_penalty": args.repeat_penalty, "seed": args.seed}


def _looks_like_model(arg: str) -> bool:
    from diptych.sources.hub import parse_hub_id

    return arg.endswith(".gguf") or Path(arg).is_dir() or parse_hub_id(arg) is not None


def _resolve_prompt(args) -> None:
    """`run [MODEL] [PROMPT]`: one argument naming a model file or folder is the model; the
    prompt then comes from a pipe (`echo hi | diptych run`), never from the model's path."""
    if args.prompt is None and args.model is not None and not _looks_like_model(args.model):
        args.model, args.prompt = None, args.model
    if args.prompt is None and not sys.stdin.isatty():
        args.prompt = sys.stdin.read().rstrip("\n")  # echo ends the line
    if args.prompt is None or not args.prompt.strip():
        raise UsageError("no prompt: give one after the model, or pipe it in "
                         "(echo 'Hi' | diptych run)")


def _describe_settings(model, kw: dict) -> str:
    params = model.sampling.with_overrides(**{k: v for k, v in kw.items()
                                              if k not in ("max_tokens", "stop",
                                                           "speculative")})
    stop = f", stop {kw['stop']}" if kw.get("stop") else ""
    return (f"[{model.name} on {model.backend.describe()}, n_ctx {model.n_ctx}; temperature "
            f"{params.temperature:g}, top-k {params.top_k}, top-p {params.top_p:g}, min-p "
            f"{params.min_p:g}, repeat penalty {params.repetition_penalty:g}, seed "
            f"{'random' if params.seed is None else params.seed}, max tokens "
            f"{kw['max_tokens']}{stop}]")


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
              f"{timings.generated_tokens} generated, {timings.decode_tps:.1f} tok/s"
              f"{_acceptance(timings)}]", file=sys.stderr)


def _acceptance(timings) -> str:
    if not timings.verify_passes:
        return ""
    return (f"; {timings.acceptance_rate:.0%} of {timings.drafted} drafts accepted, "
            f"{timings.tokens_per_pass:.2f} tokens per pass")


def _speculative(args) -> str:
    return "lookup" if args.lookup else "auto"


def cmd_run(args) -> int:
    _resolve_prompt(args)
    model = _load(args)
    kw = dict(max_tokens=args.max_tokens, stop=args.stop, **_sampling(args))
    kw["speculative"] = _speculative(args)
    if args.lookup:
        kw["lookup_ngram"] = args.lookup_ngram
    if args.verbose:
        print(_describe_settings(model, kw), file=sys.stderr)
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


def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP server (the `[server]` extra)."""
    try:
        from diptych.server.app import serve
    except ImportError as exc:
        from diptych.errors import MissingDependencyError

        raise MissingDependencyError(f"the server needs its extra: pip install "
                                     f"'diptych[server]' ({exc})") from None
    model = _load(args)
    serve(model, host=args.host, port=args.port, parallel=args.parallel,
          api_key=args.api_key or os.environ.get("DIPTYCH_API_KEY") or None, cors=args.cors,
          speculative="lookup" if args.lookup else "draft" if args.draft else None,
          lookup_ngram=args.lookup_ngram, announce=lambda line: print(line, flush=True))
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
    from diptych.inference.cache import bytes_per_token
    from diptych.load_plan import LoadPlan

    plan = LoadPlan.open(args.model, args.backend, device=args.device, n_ctx=args.n_ctx,
                         max_rollback=args.draft_max)
    path, f, cfg, be, n_ctx = plan.path, plan.source, plan.config, plan.backend, plan.n_ctx
    n_params = sum(t.n_elements for t in f.tensors.values())
    weight_bytes, kv, working = plan.weight_bytes, plan.cache_bytes, plan.working_bytes
    kinds: dict[str, Counter] = defaultdict(Counter)
    for name, t in f.tensors.items():
        kinds[tensor_kind(name)][t.type_name] += 1
    per_token, ring = bytes_per_token(cfg, be.kv_bytes_per_element())
    mib = 1 << 20
    print(f"file            {path}")
    print(f"model           {display_name(Path(path), f)}")
    print(f"name            {cfg.name} (from the file's metadata)")
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
    if not cfg.tied_output:   # only looked up: a backend may leave it as the file stores it
        rows = f.tensors["token_embd.weight"].take_rows(list(range(min(64, cfg.vocab_size))))
        print(f"  token_embd.weight: {be.weight_layout(be.prepare_table(rows))}")
    print(f"memory estimate ({be.describe()}, n_ctx {n_ctx}):")
    print(f"  weights       {weight_bytes / mib:9.1f} MiB (kept quantized)")
    print(f"  KV cache      {kv / mib:9.1f} MiB ({cache_kind(cfg)}: {per_token} bytes/token"
          + (f", plus {ring / mib:.1f} MiB of sliding-window rings" if ring else "") + ")")
    print(f"  working       {working / mib:9.1f} MiB")
    total = weight_bytes + kv + working
    if args.draft:   # the draft's weights and its own cache, beside the target's
        draft = LoadPlan.open(args.draft, be, n_ctx=n_ctx, max_rollback=args.draft_max)
        print(f"  draft weights {draft.weight_bytes / mib:9.1f} MiB ({Path(args.draft).name})")
        print(f"  draft KV      {draft.cache_bytes / mib:9.1f} MiB")
        total += draft.weight_bytes + draft.cache_bytes
    print(f"  total         {total / mib:9.1f} MiB")
    if be.prepared_layout is not None and path is not None and Path(path).is_file():
        from diptych.sources.prepared_cache import describe

        print(f"repacked copy   {describe(Path(path), be.prepared_layout)}")
    return 0


def cmd_bench(args) -> int:
    from .bench import measure_speed, measure_stream, peak_rss_bytes, random_prompt

    model = _load(args)
    prompt = random_prompt(model.config.vocab_size, args.prompt_tokens)
    prefill_tps, decode_tps = measure_speed(model, prompt, args.gen_tokens)
    print(f"model    {model.name} on {model.backend.describe()}")
    print(f"prefill  {prefill_tps:8.1f} tok/s ({args.prompt_tokens} tokens)")
    print(f"decode   {decode_tps:8.1f} tok/s ({args.gen_tokens} tokens after the prompt)")
    mode = "lookup" if args.lookup else "draft" if args.draft else None
    if mode:   # the same greedy generation, plain and speculative, side by side
        plain = measure_stream(model, prompt, args.gen_tokens, None)
        spec = measure_stream(model, prompt, args.gen_tokens, mode, args.lookup_ngram)
        ratio = spec.decode_tps / plain.decode_tps if plain.decode_tps else 0.0
        print(f"generate {plain.decode_tps:8.1f} tok/s plain, {spec.decode_tps:.1f} tok/s "
              f"{mode} ({ratio:.2f}x){_acceptance(spec)}")
    print(f"peak RSS {peak_rss_bytes() / (1 << 20):8.1f} MiB")
    return 0


def cmd_convert(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.sources.convert import convert
    from diptych.sources.hub import local_path

    folder = local_path(args.folder)   # a Hub name downloads first, with its own bar
    with Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("convert", total=None)
        out = convert(folder, args.out, args.type,
                      lambda done, total: bar.update(task, completed=done, total=total))
    print(f"wrote {out} ({out.stat().st_size / (1 << 20):.1f} MiB, {args.type.upper()})")
    return 0


def cmd_quantize(args) -> int:
    import warnings

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.sources.hub import local_path
    from diptych.sources.quantize import quantize

    source = local_path(args.input)   # a Hub name downloads first, with its own bar
    with Progress(TextColumn("quantizing {task.description:<36}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True,
                  disable=not sys.stderr.isatty()) as bar, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"diptych: warning: {msg}",
                                                          file=sys.stderr)
        task = bar.add_task("", total=None)
        out = quantize(source, args.out, args.type, allow_requantize=args.allow_requantize,
                       imatrix=args.imatrix,
                       progress=lambda name, done, total: bar.update(
                           task, description=name, completed=done, total=total))
    print(f"wrote {out} ({out.stat().st_size / (1 << 20):.1f} MiB, {args.type.upper()})")
    return 0


def cmd_fuse(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from diptych.training.fuse import fuse

    with Progress(TextColumn("fusing {task.description:<36}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("", total=None)
        result = fuse(args.model, args.adapter, args.out, args.type, scale=args.scale,
                      progress=lambda name, done, total: bar.update(
                          task, description=name, completed=done, total=total))
    out = result.path
    print(f"wrote {out} ({out.stat().st_size / (1 << 20):.1f} MiB, {len(result.fused)} "
          f"matrices merged)")
    print(result.summary())
    return 0


def cmd_imatrix(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from diptych.api import load
    from diptych.inference.imatrix import collect_imatrix

    text = _read_text(args.text)
    model = load(args.model, backend=args.backend, n_ctx=args.ctx)
    with Progress(TextColumn("collecting"), BarColumn(), MofNCompleteColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("imatrix", total=None)
        im = collect_imatrix(model, model.tokenize(text, special=False), args.ctx, args.text,
                             lambda done, total: bar.update(task, completed=done, total=total))
    out = im.save(args.out, model.config.arch)
    print(f"wrote {out} ({len(im.entries)} matrices, {im.chunk_count} chunks of {args.ctx} "
          "tokens)")
    return 0


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: cannot read the text ({exc})") from None


def cmd_perplexity(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from diptych.api import load
    from diptych.inference.perplexity import perplexity

    text = _read_text(args.text)
    numerics = "llama.cpp" if args.llama_cpp_numerics else "exact"
    model = load(args.model, backend=args.backend, n_ctx=args.ctx, numerics=numerics)
    base = load(args.kl_divergence, backend=args.backend, n_ctx=args.ctx, numerics=numerics) \
        if args.kl_divergence else None
    with Progress(TextColumn("scoring chunks"), BarColumn(), MofNCompleteColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("ppl", total=None)
        result = perplexity(model, model.tokenize(text, special=False), args.ctx, base,
                            lambda done, total: bar.update(task, completed=done, total=total))
    print(result.describe())
    return 0


def cmd_list(args) -> int:
    from diptych.sources import prepared_cache
    from diptych.sources.model_cache import cached_models

    models = cached_models()
    if not models:
        print("no downloaded models")
    for m in models:
        files = f"  ({', '.join(m.files)})" if m.files else ""
        print(f"{m.name:48s} {m.size / (1 << 20):9.1f} MiB  {m.where}{files}")
    kept = prepared_cache.kept_files()
    if kept:
        stale = sum(k.stale for k in kept)
        print(f"repacked weights kept for faster CPU loads: {len(kept)} file(s), "
              f"{sum(k.size for k in kept) / (1 << 20):.1f} MiB in {prepared_cache.folder()}"
              + (f" ({stale} for model files since removed or rewritten)" if stale else "")
              + f"; at most {prepared_cache.cap_bytes() / 1e9:g} GB (DIPTYCH_REPACK_CACHE_GB)")
    return 0


def cmd_rm(args) -> int:
    from diptych.sources.model_cache import remove

    for name in args.names:
        for path in remove(name):
            print(f"removed {name} ({path})")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    debug_help = "show the full traceback of an error"
    # after the command too; its default is the top level's alone (a subcommand's own
    # default would overwrite `diptych --debug COMMAND`'s)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=debug_help)
    p = argparse.ArgumentParser(prog="diptych", description="Run GGUF language models locally.")
    p.add_argument("--debug", action="store_true", help=debug_help)
    p.add_argument("--version", action="version", version=f"diptych {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], **kw)
        sp.set_defaults(parser=sp)  # to report usage errors found after parsing
        return sp

    def model_opts(sp, model_help="a .gguf file, a Hugging Face safetensors folder, or a model "
                   "on the Hugging Face Hub: org/repo[:QUANT] (default: the embedded "
                   "SmolLM2-135M-Instruct)"):
        sp.add_argument("model", nargs="?", help=model_help)
        sp.add_argument("--backend", default="auto",
                        help="auto | torch | mlx (default: auto: mlx on Apple silicon, else "
                             "torch, on CUDA where a GPU is present)")
        sp.add_argument("--n-ctx", type=_positive_int, default=None,
                        help="context size in tokens (default: the model's, capped at 8192)")
        sp.add_argument("--fast", action="store_true",
                        help="on a CPU with AVX-512 VNNI, round activations to 8 bits before "
                             "quantized products, as llama.cpp does: faster decoding; outputs "
                             "then depend slightly on how steps are batched")

    def device_opt(sp):
        sp.add_argument("--device", default=None,
                        help="where the backend runs: cpu | cuda | cuda:N for torch, cpu | gpu "
                             "for mlx (default: the best one present)")

    base = SamplingParams()

    def sampling_opts(sp):
        g = sp.add_argument_group(
            "sampling", "Defaults: those the model file declares (general.sampling.*), else "
            "diptych's for a model it knows (the embedded SmolLM2: greedy, repeat penalty 1.1), "
            "else llama.cpp's (shown). `run --verbose` prints the settings in effect.")
        g.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS,
                       help=f"the longest reply in tokens (default: {DEFAULT_MAX_TOKENS})")
        g.add_argument("--temperature", type=float, default=None,
                       help=f"randomness; 0 = greedy (default: {base.temperature})")
        g.add_argument("--top-k", type=int, default=None,
                       help=f"keep the k likeliest tokens; 0 = off (default: {base.top_k})")
        g.add_argument("--top-p", type=float, default=None,
                       help=f"keep the likeliest tokens up to this total probability "
                            f"(default: {base.top_p})")
        g.add_argument("--min-p", type=float, default=None,
                       help=f"drop tokens less likely than this fraction of the likeliest "
                            f"(default: {base.min_p})")
        g.add_argument("--repeat-penalty", type=float, default=None,
                       help=f"divide the odds of recently seen tokens; 1 = off "
                            f"(default: {base.repetition_penalty})")
        g.add_argument("--seed", type=int, default=None,
                       help="random seed, for reproducible sampling (default: random)")
        sp.add_argument("--system", default=None, help="a system prompt")

    def speculative_opts(sp):
        g = sp.add_argument_group("speculative decoding (output unchanged, sooner)")
        way = g.add_mutually_exclusive_group()
        way.add_argument("--draft", metavar="SMALL.gguf", default=None,
                         help="a small model with the same tokenizer drafts tokens")
        way.add_argument("--lookup", action="store_true",
                         help="drafts copied from the prompt (prompt lookup)")
        g.add_argument("--draft-max", type=_positive_int, default=DEFAULT_DRAFT_MAX,
                       help=f"most tokens drafted per step (default: {DEFAULT_DRAFT_MAX})")
        g.add_argument("--lookup-ngram", type=_positive_int, default=DEFAULT_LOOKUP_NGRAM,
                       metavar="N", help=f"prompt lookup drafts what followed the context's "
                                         f"last N tokens, else fewer (default: "
                                         f"{DEFAULT_LOOKUP_NGRAM})")

    from .chat import cmd_chat

    def adapter_opt(sp):
        sp.add_argument("--adapter", default=None, metavar="PATH",
                        help="a LoRA adapter: a PEFT folder, a GGUF LoRA file, or a finetune "
                             "run's folder")

    sp = command("chat", help="chat in the terminal (full-screen app)")
    model_opts(sp)
    sampling_opts(sp)
    speculative_opts(sp)
    adapter_opt(sp)
    sp.set_defaults(func=cmd_chat)

    sp = command("run", help="answer one prompt, streamed to stdout",
                        usage="diptych run [MODEL] PROMPT [options]\n"
                              "       echo PROMPT | diptych run [MODEL] [options]")
    model_opts(sp)
    sp.add_argument("prompt", nargs="?", help="the prompt (default: read from a pipe)")
    sampling_opts(sp)
    speculative_opts(sp)
    sp.add_argument("--raw", action="store_true",
                    help="plain completion of the prompt, without the chat template")
    sp.add_argument("--stop", action="append", default=None, metavar="TEXT",
                    help="end the reply where this text appears (not printed); repeatable")
    sp.add_argument("--verbose", "-v", action="store_true",
                    help="print the model and the sampling settings in effect to stderr")
    adapter_opt(sp)
    device_opt(sp)
    sp.set_defaults(func=cmd_run)

    sp = command("info", help="describe a model file and its memory needs")
    sp.add_argument("model", nargs="?", help="a .gguf file, a Hugging Face folder or "
                    "org/repo[:QUANT] on the Hub (default: the embedded model)")
    sp.add_argument("--n-ctx", type=_positive_int, default=None,
                    help="context size for the memory estimate (default: the model's, "
                         "capped at 8192)")
    sp.add_argument("--backend", default="auto", help="whose weight layouts to show")
    sp.add_argument("--draft", metavar="SMALL.gguf", default=None,
                    help="count a speculative draft model's weights and cache too")
    sp.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX,
                    help="tokens the caches can roll back (as load's draft_max)")
    device_opt(sp)
    sp.set_defaults(func=cmd_info)

    sp = command("bench", help="measure prefill and decode speed and peak memory")
    model_opts(sp)
    sp.add_argument("--prompt-tokens", type=_positive_int, default=256,
                    help="prompt length to time (default: 256)")
    sp.add_argument("--gen-tokens", type=_positive_int, default=128,
                    help="tokens to decode after it (default: 128)")
    speculative_opts(sp)
    device_opt(sp)
    sp.set_defaults(func=cmd_bench)

    # the model options are `run`'s (model_opts): options added there reach serve as well
    sp = command("serve", help="serve a model over an OpenAI-compatible HTTP API")
    model_opts(sp)
    device_opt(sp)
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free)")
    sp.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on every request (default: "
                         "$DIPTYCH_API_KEY if set, else no key)")
    sp.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                    help="requests served at once, each in its own cache slot of n_ctx "
                         "tokens (default: 1)")
    sp.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                    help="let web pages from ORIGIN call the server ('*': any); repeatable")
    speculative_opts(sp)
    sp.set_defaults(func=cmd_serve)

    from diptych.sources.convert import CONVERT_TYPES

    sp = command("convert", help="write a Hugging Face safetensors folder as GGUF")
    sp.add_argument("folder", help="a folder with config.json, *.safetensors and the tokenizer, "
                    "or org/repo on the Hugging Face Hub")
    sp.add_argument("out", help="the .gguf file to write")
    sp.add_argument("--type", default="F16", type=str.upper, choices=CONVERT_TYPES,
                    help="type of the weight matrices (default: F16); vectors stay F32")
    sp.set_defaults(func=cmd_convert)

    from diptych.sources.quantize import QUANTIZE_MIXES

    sp = command("quantize", help="write a model as GGUF in a quantization mix (Q4_K_M, ...)")
    sp.add_argument("input",
                    help="an F32/F16/BF16 .gguf file or a Hugging Face safetensors folder (or "
                         "org/repo[:QUANT] on the Hub)")
    sp.add_argument("out", help="the .gguf file to write")
    sp.add_argument("--type", default="Q4_K_M", type=str.upper, choices=QUANTIZE_MIXES,
                    help="the mix, as llama.cpp names it (default: Q4_K_M)")
    sp.add_argument("--allow-requantize", action="store_true",
                    help="accept a quantized input (lossy: both roundings add up)")
    sp.add_argument("--imatrix", metavar="FILE", default=None,
                    help="an importance matrix (diptych imatrix, llama-imatrix .gguf or .dat): "
                         "weigh the K-quants' rounding by it")
    sp.set_defaults(func=cmd_quantize)

    from .finetune import add_options, cmd_finetune

    sp = command("finetune", help="train a LoRA adapter on the model as its file stores it")
    sp.add_argument("model", nargs="?", help="a .gguf file, a Hugging Face safetensors folder, "
                    "or org/repo[:QUANT] (default: the embedded SmolLM2-135M-Instruct)")
    sp.add_argument("--data", required=True,
                    help="a JSONL file ({\"text\"}, {\"prompt\", \"completion\"} or "
                         "{\"messages\"} per line) or a folder with train/valid/test.jsonl")
    sp.add_argument("--out", default=None,
                    help="the adapter's folder (PEFT files, adapter.gguf, checkpoint)")
    sp.add_argument("--valid", default=None, help="a validation JSONL file")
    sp.add_argument("--test", nargs="?", const=True, default=None, metavar="FILE",
                    help="report test loss and perplexity (of FILE, or the data folder's "
                         "test.jsonl)")
    sp.add_argument("--resume", default=None, metavar="DIR",
                    help="continue the run saved in DIR (Ctrl+C saves one)")
    sp.add_argument("--config", default=None, help="a YAML or TOML file of training options")
    sp.add_argument("--backend", default="auto")
    device_opt(sp)
    add_options(sp)
    sp.set_defaults(func=cmd_finetune)

    from diptych.training.fuse import FUSE_TYPES

    sp = command("fuse", help="merge a LoRA adapter into a model's weights, written as GGUF")
    sp.add_argument("model", help="a .gguf file, a Hugging Face folder or org/repo[:QUANT]")
    sp.add_argument("adapter", help="a PEFT folder, a GGUF LoRA file or a finetune run's folder")
    sp.add_argument("out", help="the .gguf file to write")
    sp.add_argument("--type", default=None, type=str.upper, choices=FUSE_TYPES,
                    help="F32, F16, BF16 or a quantization mix (default: each tensor keeps "
                         "its type; a merged matrix written quantized is rounded again)")
    sp.add_argument("--scale", type=float, default=1.0,
                    help="multiply the adapter's scaling by this (default: 1)")
    sp.set_defaults(func=cmd_fuse)

    sp = command("perplexity", help="perplexity of a model on a text (llama-perplexity's "
                 "chunked method), and KL divergence against a base model")
    sp.add_argument("model", help="a .gguf file, a Hugging Face folder or org/repo[:QUANT]")
    sp.add_argument("text", help="a UTF-8 text file")
    sp.add_argument("--ctx", type=_positive_int, default=512,
                    help="tokens per chunk (default: 512)")
    sp.add_argument("--kl-divergence", metavar="BASE", default=None,
                    help="a base model (same vocabulary): also report KL(base || model) and "
                         "top-1 agreement")
    sp.add_argument("--llama-cpp-numerics", action="store_true",
                    help="round each product's input as llama.cpp's CPU backend does (8-bit "
                         "blocks before quantized weights), to compare with llama.cpp's "
                         "figures (torch backend on the CPU)")
    sp.add_argument("--backend", default="auto")
    sp.set_defaults(func=cmd_perplexity)

    sp = command("imatrix", help="collect an importance matrix for quantize --imatrix "
                 "(llama-imatrix's statistics and file)")
    sp.add_argument("model", help="a .gguf file, a Hugging Face folder or org/repo[:QUANT]")
    sp.add_argument("text", help="a UTF-8 text file (calibration data)")
    sp.add_argument("-o", "--out", default="imatrix.gguf",
                    help="the file to write (default: imatrix.gguf)")
    sp.add_argument("--ctx", type=_positive_int, default=512,
                    help="tokens per chunk (default: 512)")
    sp.add_argument("--backend", default="auto")
    sp.set_defaults(func=cmd_imatrix)

    sp = command("list", help="show downloaded models (Hugging Face cache and diptych's) and "
                              "the repacked copies kept for them")
    sp.set_defaults(func=cmd_list)

    sp = command("rm", help="remove downloaded models (and their repacked copies)")
    sp.add_argument("names", nargs="+", metavar="NAME",
                    help="org/repo (the whole repository) or a file name from `diptych list`")
    sp.set_defaults(func=cmd_rm)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with options allowed between a command's positionals (`diptych run MODEL
    --max-tokens 20 "a prompt"`): argparse alone gives an optional positional (the prompt)
    nothing once an option has come between, then rejects the prompt. argparse's
    intermixed parsing does not take subcommands, so the command's own parser reparses the
    words after the command's name."""
    args, rest = parser.parse_known_args(argv)
    if not rest:
        return args
    if args.command is None:
        return parser.parse_args(argv)   # reports the unknown words
    words = argv[argv.index(args.command) + 1:]   # the first word not an option is the command
    sub = args.parser.parse_intermixed_args(words)
    sub.command, sub.debug = args.command, args.debug   # args.debug: before or after it
    return sub


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted (Ctrl+C)."""
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))  # exits with 2
    except KeyboardInterrupt:
        print("\ndiptych: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`diptych run ... | head -c1`): stop quietly; point stdout at
        # /dev/null so that the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug shows the rest
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, DiptychError):
            print(f"diptych: error: {exc}", file=sys.stderr)
        else:
            print(f"diptych: internal error: {type(exc).__name__}: {exc} (--debug shows where)",
                  file=sys.stderr)
        return 1
