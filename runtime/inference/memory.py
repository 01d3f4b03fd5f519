"""Memory planning: refuse a load or a context that would not fit, before allocating."""

from __future__ import annotations

import psutil

from .cache import bytes_per_token
from diptych.model.config import ModelConfig
from diptych.errors import InvalidArgumentError, OutOfMemoryError

DEFAULT_MAX_CTX = 8192  # default n_ctx cap: a model's trained context can be 128k+
CACHE_SHARE = 0.25      # a default n_ctx may use at most this share of available memory


def available_bytes() -> int:
    return psutil.virtual_memory().available


def activation_bytes(cfg: ModelConfig, n_batch: int, bytes_per_element: int = 4) -> int:
    """Working memory of one prefill chunk: the widest activations plus logits."""
    widest = max(cfg.d_ff * 2, cfg.q_dim + 2 * cfg.kv_dim, cfg.d_model * 4,
                 cfg.moe.d_ff * 2 * cfg.moe.n_used if cfg.moe else 0)
    return n_batch * (widest + cfg.vocab_size) * bytes_per_element


def choose_n_ctx(cfg: ModelConfig, requested: int | None, kv_bytes_per_element: int) -> int:
    per_token, fixed = bytes_per_token(cfg, kv_bytes_per_element)
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
            raise InvalidArgumentError(f"n_ctx must be an integer >= 2, got {requested!r}")
        return requested
    n = min(cfg.context_length, DEFAULT_MAX_CTX)
    fit = int((available_bytes() * CACHE_SHARE - fixed) // max(per_token, 1))
    return max(256, min(n, fit))


def check_fits(weights_bytes: int, cache_bytes: int, scratch_bytes: int, what: str) -> None:
    need = weights_bytes + cache_bytes + scratch_bytes
    have = available_bytes()
    if need > have:
        gib = 1 << 30
        raise OutOfMemoryError(
            f"{what} needs about {need / gib:.2f} GiB (weights {weights_bytes / gib:.2f}, "
            f"KV cache {cache_bytes / gib:.2f}, working memory {scratch_bytes / gib:.2f}) but "
            f"only {have / gib:.2f} GiB is available; use a smaller n_ctx or a smaller model")
