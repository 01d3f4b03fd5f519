"""What a hostile case does, run inside an isolated child (tests/hostile/isolation.py).

Each probe goes through the public API as a user would and returns what a user gets (text);
whatever it raises is recorded by the isolation layer.
"""

from __future__ import annotations

import math
from pathlib import Path

MESSAGES = [{"role": "user", "content": "Say hello."}]


def generate(path: Path, temperature: float = 0.0, backend: str = "auto") -> str:
    import diptych

    model = diptych.load(path, backend=backend, n_ctx=64)
    return _text(model.generate("hello world", max_tokens=4, temperature=temperature, seed=1))


def logits(path: Path) -> str:
    import diptych

    model = diptych.load(path, n_ctx=64)
    return repr(model.logits(model.tokenize("hello world")).shape)


def chat(path: Path) -> str:
    import diptych

    model = diptych.load(path, n_ctx=256)
    return _text(model.chat(MESSAGES, max_tokens=4, temperature=0))


def plan(path: Path) -> int:
    """What `diptych info` and the memory planner read: config, default n_ctx, cache size."""
    from diptych.inference.cache import KVCache
    from diptych.inference.memory import activation_bytes, choose_n_ctx
    from diptych.model.families.gguf import config_from_gguf
    from diptych.sources.hf_folder import open_source

    src = open_source(path)
    cfg = config_from_gguf(src.metadata, {n: t.shape for n, t in src.tensors.items()})
    n_ctx = choose_n_ctx(cfg, None, 4)
    return KVCache.bytes_needed(cfg, n_ctx, 4, 64) + activation_bytes(cfg, 64)


def render(template: str) -> str:
    from diptych.text.chat_template import render_chat

    return _text(render_chat(template, MESSAGES))


def _text(value) -> str:
    if not isinstance(value, str):
        raise AssertionError(f"returned {type(value).__name__}, not text")
    return value


def warm_up(paths: dict) -> None:
    """First calls compile kernels and fill caches: pay for them once, in the server."""
    for fam, path in paths.items():
        if fam != "hf":
            generate(path)
            generate(path, temperature=0.8)
    generate(paths["hf"])
    render("{% for m in messages %}{{ m.content|upper }}{% endfor %}")
    assert math.isfinite(plan(paths["llama"]))
