"""The Python API: `diptych.load(...)` and `Model`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .inference.cache import KVCache
from .inference.engine import Engine
from .errors import InvalidArgumentError
from .inference.generate import Piece, stream_tokens
from .inference.memory import activation_bytes, check_fits, choose_n_ctx
from .inference.sampling import DEFAULT_MAX_TOKENS, model_sampling
from .model.display_name import display_name
from .text.tokenizer import Tokenizer


class Model:
    """A loaded model: tokenizer, weights on a backend, and a KV cache of `n_ctx` tokens.

    One Model holds one conversation's cache; successive calls reuse the longest common
    prefix of token ids with what the cache holds. `sampling` holds the model's default
    sampling settings (see `model_sampling`); keywords of each call override them.
    """

    def __init__(self, path: Path, gguf, config, tokenizer: Tokenizer, engine: Engine):
        self.path = path
        self.gguf = gguf
        self.config = config
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = display_name(path, gguf)
        self.sampling = model_sampling(gguf.metadata)

    # -- facts -----------------------------------------------------------------------------
    @property
    def backend(self):
        return self.engine.backend

    @property
    def n_ctx(self) -> int:
        return self.engine.cache.capacity

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, arch={self.config.arch}, "
                f"backend={self.backend.describe()}, n_ctx={self.n_ctx})")

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS rule unless `add_bos` says otherwise."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits, float32 (len(ids), vocab), for evaluation."""
        ids = self._check_ids(ids)
        self.engine.cache.rewind(0)
        return self.engine.eval(ids, all_logits=True)

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_tokens: int = DEFAULT_MAX_TOKENS, *, stop=None,
               **sampling) -> Iterator[Piece]:
        """Yield `Piece`s (text, token ids, timings) as the model generates.

        `prompt` is text (tokenized with the model's BOS rule) or token ids. Sampling
        keywords: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        penalty_last_n, seed (see SamplingParams); None or absent: the model's default
        (`self.sampling`). Ctrl+C (KeyboardInterrupt) stops
        generation and leaves the model usable.
        """
        params = self.sampling.with_overrides(**sampling)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return stream_tokens(self.engine, self.tokenizer, ids, max_tokens, params, stops)

    def generate(self, prompt: str | list[int], max_tokens: int = DEFAULT_MAX_TOKENS,
                 **kwargs) -> str:
        return "".join(p.text for p in self.stream(prompt, max_tokens, **kwargs))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's own chat template (ChatML when
        the file has none). The template writes BOS itself where the model wants one."""
        text = self.tokenizer.apply_chat_template(messages,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_bos=False, parse_special=True)

    def chat_stream(self, messages: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS,
                    **kwargs) -> Iterator[Piece]:
        return self.stream(self.chat_prompt(messages), max_tokens, **kwargs)

    def chat(self, messages: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS, **kwargs) -> str:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts)."""
        return "".join(p.text for p in self.chat_stream(messages, max_tokens, **kwargs))

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise InvalidArgumentError("no token ids given")
        return ids


def load(source: str | Path | None = None, *, backend: str = "auto", n_ctx: int | None = None,
         n_batch: int = 256, progress: Callable[[int, int], None] | None = None) -> Model:
    """Load a GGUF model or a Hugging Face safetensors folder (config.json, *.safetensors,
    tokenizer); with no source, the embedded default (SmolLM2-135M-Instruct Q4_1).

    `n_ctx` is the context (KV cache) size in tokens: by default the model's own, capped at
    8192 and at a quarter of available memory. `progress(done, total)` receives bytes.
    """
    from diptych.backends import select

    from .sources.default_model import default_model_path
    from .model.families.gguf import config_from_gguf
    from .sources.hf_folder import open_source
    from .model.weights import load_weights

    path = Path(source) if source is not None else default_model_path()
    if not isinstance(n_batch, int) or n_batch < 1:
        raise InvalidArgumentError(f"n_batch must be a positive integer, got {n_batch!r}")
    # a Hugging Face folder reads as the GGUF file llama.cpp's converter would write
    gguf = open_source(path)
    cfg = config_from_gguf(gguf.metadata, {n: t.shape for n, t in gguf.tensors.items()})
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    be = select(backend)
    ctx = choose_n_ctx(cfg, n_ctx, be.kv_bytes_per_element())
    weight_bytes = sum(t.nbytes for t in gguf.tensors.values())
    check_fits(weight_bytes, KVCache.bytes_needed(cfg, ctx, be.kv_bytes_per_element(), n_batch),
               activation_bytes(cfg, n_batch), f"{path.name} with n_ctx={ctx}")
    done = 0

    def step(n):
        nonlocal done
        done += n
        if progress:
            progress(done, weight_bytes)

    weights = load_weights(gguf.tensors, cfg, be, step)
    return Model(path, gguf, cfg, tokenizer, Engine(be, cfg, weights, ctx, n_batch))
