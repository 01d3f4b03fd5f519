"""`diptych finetune`: the command line of `diptych.finetune`, with a progress bar.

Every `TrainOptions` field is a flag of the same name (`learning_rate` -> --learning-rate;
booleans also as --no-NAME; lists comma-separated); a --config file (YAML or TOML) gives
defaults that flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from diptych.training.options import TrainOptions


def add_options(sp: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field; unset flags stay None (not passed on)."""
    g = sp.add_argument_group("training options (see diptych.training.options.TrainOptions)")
    hints = typing.get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        default = f"(default: {f.default})"
        if hint == "<class 'bool'>":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=default)
        elif "choices" in f.metadata:
            g.add_argument(flag, choices=f.metadata["choices"], default=None, help=default)
        elif "tuple" in hint:
            g.add_argument(flag, default=None, metavar="A,B,...", help=default)
        else:
            kind = int if "int" in hint and "float" not in hint else float
            g.add_argument(flag, type=kind, default=None, help=default)


def cmd_finetune(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from diptych.training.finetune import finetune

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
               if getattr(args, f.name) is not None}
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("train", total=None, status="")

        def progress(r):
            valid = f"  valid {r.valid_loss:.4f}" if r.valid_loss is not None else ""
            bar.update(task, completed=r.step, total=r.total, status=(
                f"loss {r.loss:.4f}{valid}  lr {r.learning_rate:.2e}  "
                f"{r.tokens_per_second:.0f} tok/s  ETA {_clock(r.eta_seconds)}"))
            if not sys.stderr.isatty():
                print(f"step {r.step}/{r.total} loss {r.loss:.4f}{valid}", file=sys.stderr,
                      flush=True)

        result = finetune(args.model, train=args.data, valid=args.valid,
                          test=args.test, out=args.out, resume=args.resume,
                          config=args.config, backend=args.backend, device=args.device,
                          progress=progress, **options)
    if result.interrupted:
        print(f"interrupted after step {result.steps}: checkpoint saved in {result.out}; "
              f"continue with --resume {result.out}", file=sys.stderr)
        return 130
    line = (f"trained {result.steps} step{'s' if result.steps != 1 else ''}: "
            f"loss {result.train_loss:.4f}")
    if result.valid_loss is not None:
        line += f", validation loss {result.valid_loss:.4f}"
    print(line + f" ({result.compute_dtype} products); adapter in {result.out}")
    if result.test_loss is not None:
        print(f"test loss {result.test_loss:.4f}, perplexity {result.test_perplexity:.3f}")
    return 0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
