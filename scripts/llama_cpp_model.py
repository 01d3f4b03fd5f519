"""Open a model in llama-cpp-python the way every reference script here needs it."""

from __future__ import annotations

from pathlib import Path


def open_llama(path: Path, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` without llama.cpp's extra CPU buffer types: its AMX
    matmul path crashes on these CPUs (llama.cpp #20824). llama-cpp-python 0.3.x swallows
    unknown Llama(...) kwargs, so `use_extra_bufts=False` is set on the C model params."""
    import llama_cpp

    low = llama_cpp.llama_cpp
    default_params = low.llama_model_default_params

    def no_extra_bufts():
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_extra_bufts
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        low.llama_model_default_params = default_params


def smollm2_from_args(description: str) -> Path:
    """A fixture script's `--smollm2 PATH` argument, else diptych's default model file."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smollm2")
    args = ap.parse_args()
    if args.smollm2:
        return Path(args.smollm2)
    from diptych.sources.default_model import default_model_path

    return default_model_path()
