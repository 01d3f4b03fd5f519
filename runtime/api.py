"""The Python API: `diptych.load(...)` and `Model`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from diptych.backends.base import Backend

from .errors import InvalidArgumentError, NumericalError
from .inference.constraint import JsonConstraint
from .inference.engine import Engine
from .inference.generate import Piece, exclusive, stream_tokens
from .inference.speculative import (DEFAULT_DRAFT_MAX, DEFAULT_LOOKUP_NGRAM, DraftLength,
                                    LookupDraft, ModelDraft, check_draft_max, pass_costs,
                                    stream_speculative)
from .inference.sampling import DEFAULT_MAX_TOKENS, model_sampling
from .inference.speculative_costs import pair_costs
from .load_plan import LoadPlan
from .model.display_name import display_name
from .numerics import apply_numerics, backend_for, check_numerics
from .text.chat_prompt import chat_ids
from .text.draft_vocab import check_compatible
from .text.tokenizer import Tokenizer


class Model:
    """A loaded model: tokenizer, weights on a backend, and a KV cache of `n_ctx` tokens.

    One Model holds one conversation's cache; successive calls reuse the longest common
    prefix of token ids with what the cache holds. It generates one sequence at a time: a
    generation started while another is unfinished (on any thread) replaces it, and the
    older one raises `GenerationSuperseded` at its next step. `sampling` holds the model's
    default sampling settings (see `model_sampling`); keywords of each call override them.
    """

    def __init__(self, path: Path, gguf, config, tokenizer: Tokenizer, engine: Engine):
        self.path = path
        self.gguf = gguf
        self.config = config
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = display_name(path, gguf)
        self.sampling = model_sampling(gguf.metadata)
        self.adapter: str | None = None   # the LoRA adapter in use (its path), if any
        self.draft: Model | None = None   # the draft model of speculative decoding
        self._draft_seq = None            # the draft's Sequence drafting for this model
        self._spec_costs: dict = {}       # (mode, draft_max) -> Costs, measured once

    # -- facts -----------------------------------------------------------------------------
    @property
    def backend(self):
        return self.engine.backend

    @property
    def n_ctx(self) -> int:
        return self.engine.capacity

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, arch={self.config.arch}, "
                f"backend={self.backend.describe()}, n_ctx={self.n_ctx})")

    def set_adapter(self, adapter: str | Path | None, scale: float = 1.0) -> None:
        """Use the LoRA adapter at `adapter` (a PEFT folder, a GGUF LoRA file, or a
        fine-tuning run's folder) at `scale` times its own scaling, replacing any other; None
        removes it. The base weights are not reloaded; cached keys and values (computed
        under the old adapter) are dropped and an unfinished generation is superseded."""
        from .model.adapter_files import read_adapter
        from .model.adapters import apply_adapter

        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise InvalidArgumentError(f"scale must be a number, got {scale!r}")
        pairs, factor = {}, 0.0
        if adapter is not None:
            lora = read_adapter(adapter, self.config)
            pairs, factor = lora.pairs, lora.scale * scale
        layers = self.engine.weights.layers
        self.engine.set_adapters(
            lambda: apply_adapter(self.backend, self.config, layers, pairs, factor))
        self.adapter = None if adapter is None else str(adapter)
        self._spec_costs.clear()   # measured with the old adapter's work in each step

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS rule unless `add_bos` says otherwise."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits, float32 (len(ids), vocab), for evaluation.

        NumericalError when any logit is NaN or infinite (broken weights), rather than
        rows that poison every figure computed from them."""
        ids = self._check_ids(ids)
        engine = self.engine
        with engine.lock:
            engine.release(engine.claim())   # supersedes an unfinished generation
            engine.reset()
            logits = engine.eval(ids, all_logits=True)
        bad = ~np.isfinite(logits).all(axis=1)
        if bad.any():
            raise NumericalError.logits(f"at position {int(bad.argmax())} of {len(ids)}")
        return logits

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_tokens: int = DEFAULT_MAX_TOKENS, *, stop=None,
               json_schema: dict | None = None,
               speculative: str | None = "auto", draft_max: int | None = None,
               lookup_ngram: int = DEFAULT_LOOKUP_NGRAM, **sampling) -> Iterator[Piece]:
        """Yield `Piece`s (text, token ids, timings) as the model generates.

        `prompt` is text (tokenized with the model's BOS rule) or token ids. Sampling
        keywords: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, penalty_last_n, logit_bias, seed (see SamplingParams); None or
        absent: the model's default (`self.sampling`). `json_schema`: a JSON schema the
        output must follow (it parses and validates, written compactly unless the schema's
        "x-guidance" asks otherwise; {"type": "object"}: any JSON object),
        through llguidance (the `[server]` extra); speculative decoding follows it too (the
        draft's and the target's distributions both masked). Ctrl+C (KeyboardInterrupt) stops
        generation and leaves the model usable.

        `speculative`: "draft" (the draft model given to `load`), "lookup" (prompt lookup:
        drafts copied from earlier in the context, where its last tokens align best, else
        after the latest match of its last `lookup_ngram` tokens), None (plain
        decoding) or "auto" ("draft" when a draft is loaded, else None). Either way the
        output is the target's: greedy, its argmax; sampling, its distribution. `draft_max`
        bounds the tokens drafted per pass (default, and at most: the `draft_max` given to
        `load`). Each Piece's timings count drafted and accepted tokens and verify passes.
        """
        params = self.sampling.with_overrides(**sampling)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        stops = _check_stops(stop)
        mode = self._speculative_mode(speculative)
        constraint = None if json_schema is None else JsonConstraint(
            self.tokenizer, self.config.vocab_size, json_schema)
        if mode is None:
            return exclusive(self.engine, stream_tokens(self.engine, self.tokenizer, ids,
                                                        max_tokens, params, stops,
                                                        constraint=constraint))
        draft_max = self.engine.max_rollback if draft_max is None else draft_max
        if mode == "draft":
            check_draft_max(draft_max, self.engine.main, self._draft_seq)
            drafter = ModelDraft(self._draft_seq, params, self.config.vocab_size)
        else:
            check_draft_max(draft_max, self.engine.main)
            if not isinstance(lookup_ngram, int) or isinstance(lookup_ngram, bool) \
                    or lookup_ngram < 1:
                raise InvalidArgumentError(f"lookup_ngram must be a positive integer, got "
                                           f"{lookup_ngram!r}")
            drafter = LookupDraft(lookup_ngram)

        def run():
            length = DraftLength(draft_max, self._costs(mode, draft_max, ids[-1]))
            yield from stream_speculative(self.engine, self.tokenizer, ids, max_tokens, params,
                                          stops, drafter, length, constraint)

        return exclusive(self.engine, run())

    def _speculative_mode(self, speculative) -> str | None:
        if speculative == "auto":
            return "draft" if self.draft is not None else None
        if speculative not in ("draft", "lookup", None):
            raise InvalidArgumentError(f"speculative must be 'draft', 'lookup', None or "
                                       f"'auto', got {speculative!r}")
        if speculative == "draft" and self.draft is None:
            raise InvalidArgumentError("speculative='draft' needs a draft model: "
                                       "load(target, draft=...)")
        return speculative

    def _costs(self, mode: str, draft_max: int, token: int):
        """The costs of drafting in `mode` (measured on this machine's first use, then kept:
        speculative_costs.py)."""
        key = (mode, draft_max)
        if key not in self._spec_costs:
            draft = self._draft_seq if mode == "draft" else None
            self._spec_costs[key] = pair_costs(
                self, mode, draft_max, lambda: pass_costs(self.engine.main, draft, draft_max,
                                                          token))
        return self._spec_costs[key]

    def attach_draft(self, draft: Model, own: bool = False) -> None:
        """Draft for this model with `draft` (a Model with the same tokenizer). It drafts in
        its own cache: its first one when `own` (nobody else uses the Model), else a new
        one opened beside its first."""
        if not isinstance(draft, Model):
            raise InvalidArgumentError(f"a draft is a path or a loaded Model, not "
                                       f"{type(draft).__name__}")
        if draft is self:
            raise InvalidArgumentError("a model cannot be its own draft")
        check_compatible(self.tokenizer, draft.tokenizer)
        rollback = self.engine.max_rollback
        if own and draft.engine.max_rollback >= rollback:
            seq = draft.engine.main
        else:
            seq = draft.engine.open_sequence(max_rollback=rollback)
        self.draft, self._draft_seq = draft, seq
        self._spec_costs.clear()

    def generate(self, prompt: str | list[int], max_tokens: int = DEFAULT_MAX_TOKENS,
                 **kwargs) -> str:
        return "".join(p.text for p in self.stream(prompt, max_tokens, **kwargs))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    special_in_content: bool = False) -> list[int]:
        """Token ids of `messages` rendered with the model's own chat template (ChatML when
        the file has none). The template writes BOS itself where the model wants one.

        Control tokens count only where the template wrote them: a message that spells
        "<|im_start|>" gets it as plain text, unless `special_in_content` (trusted messages)."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                        special_in_content=special_in_content)

    def chat_stream(self, messages: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS,
                    **kwargs) -> Iterator[Piece]:
        return self.stream(self.chat_prompt(messages), max_tokens, **kwargs)

    def chat(self, messages: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS, **kwargs) -> str:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts)."""
        return "".join(p.text for p in self.chat_stream(messages, max_tokens, **kwargs))

    def _check_ids(self, ids) -> list[int]:
        """A prompt of token ids: a list, tuple or integer numpy array of ints (bytes or text
        are not token ids, and a float is not silently truncated)."""
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InvalidArgumentError(f"a prompt is a str or a list of token ids (ints), "
                                       f"not {type(ids).__name__}")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise InvalidArgumentError(f"token ids must be ints, got {i!r} "
                                           f"({type(i).__name__})")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise InvalidArgumentError("no token ids given")
        return ids


def _check_stops(stop) -> list[str]:
    """`stop` as a list of strings: one string, or a list or tuple of them."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
    return list(stops)


def load(source: str | Path | None = None, *, backend: str | Backend = "auto",
         device: str | None = None, n_ctx: int | None = None, n_batch: int = 256,
         progress: Callable[[int, int], None] | None = None,
         adapter: str | Path | None = None,
         draft: str | Path | Model | None = None,
         draft_max: int = DEFAULT_DRAFT_MAX, numerics: str = "exact") -> Model:
    """Load a GGUF model or a Hugging Face safetensors folder (config.json, *.safetensors,
    tokenizer), or one on the Hugging Face Hub by name (`"org/repo:Q4_K_M"`, downloaded once;
    see `diptych.sources.hub`); a bare file name not in the working folder is looked up in
    diptych's model cache; with no source, the embedded default (SmolLM2-135M-Instruct
    Q4_1).

    `backend` is "auto" (MLX on Apple silicon, else torch), "torch", "mlx" or a Backend
    instance; `device` chooses where a named backend runs ("cpu", "cuda", "cuda:N" for
    torch; "cpu", "gpu" for MLX; default: the best one present). `n_ctx` is the context (KV
    cache) size in tokens: by default the model's own, capped at 8192 and at a quarter of
    available memory. `progress(done, total)` receives bytes. `adapter`: a LoRA adapter to
    use (see `Model.set_adapter`). `numerics`: "exact" (default: activations at their own
    precision), "fast" (the backend's fastest products: on a CPU with AVX-512 VNNI,
    activations rounded to 8 bits before quantized weights, as llama.cpp does; outputs then
    depend on how steps are cut and batched) or "llama.cpp", products rounded as llama.cpp's
    CPU backend rounds them, to compare figures with llama.cpp's (the torch backend on the
    CPU; see `diptych.numerics`).

    `draft`: a draft model for speculative decoding (a path, loaded on the same backend with
    the same n_ctx, or a loaded Model, whose weights are then shared and which drafts in a
    cache of its own); its tokenizer must be the target's (IncompatibleDraftError names the
    first difference). `draft_max`: the most tokens a speculative pass drafts; the caches
    are sized to roll that many back.
    """
    if not isinstance(draft_max, int) or isinstance(draft_max, bool) or draft_max < 0:
        raise InvalidArgumentError(f"draft_max must be an integer >= 0, got {draft_max!r}")
    check_numerics(numerics)
    backend, device = backend_for(numerics, backend, device)
    plan = LoadPlan.open(source, backend, device=device, n_ctx=n_ctx, n_batch=n_batch,
                         max_rollback=draft_max)
    apply_numerics(plan.backend, numerics)
    tokenizer = plan.tokenizer()
    model = Model(plan.path, plan.source, plan.config, tokenizer, plan.engine(progress))
    if adapter is not None:
        model.set_adapter(adapter)
    if draft is not None:
        own = not isinstance(draft, Model)
        if own:
            draft = load(draft, backend=model.backend, n_ctx=model.n_ctx, n_batch=n_batch,
                         draft_max=draft_max, numerics=numerics)
        model.attach_draft(draft, own=own)
    return model
