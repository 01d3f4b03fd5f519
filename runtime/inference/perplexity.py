"""Perplexity and KL divergence over a text, by llama-perplexity's chunked method.

The text is tokenized once (with the model's BOS rule) and cut into consecutive chunks of
`n_ctx` tokens (the tail that does not fill a chunk is dropped). Each chunk is evaluated
from an empty cache, its first token replaced by BOS where the model adds one, and only
the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens
after them, so every scored token sees at least n_ctx/2 tokens of context. Perplexity is
exp(mean negative log-likelihood) over all scored tokens.

With a base model (the same vocabulary; typically the F16 file a quantized one came from),
the same positions also give KL(base || model) of the next-token distributions and how
often both models' most likely tokens agree, as llama-perplexity's --kl-divergence does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diptych.errors import InvalidArgumentError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_chunks: int
    n_scored: int
    kl_mean: float | None = None      # nats, mean over the scored positions
    top1_agreement: float | None = None

    def describe(self) -> str:
        text = f"perplexity {self.ppl:.4f} over {self.n_scored} tokens in {self.n_chunks} chunks"
        if self.kl_mean is not None:
            text += (f"\nKL divergence {self.kl_mean:.6f} nats, same top-1 token "
                     f"{100 * self.top1_agreement:.2f}%")
        return text


def chunk_tokens(tokens: list[int], n_ctx: int, bos_id: int | None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates: whole n_ctx runs, each starting with BOS when
    `bos_id` is given (the model adds BOS)."""
    if n_ctx < 4:
        raise InvalidArgumentError(f"the context must hold at least 4 tokens, not {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise InvalidArgumentError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at "
            f"least {2 * n_ctx} (use a longer text or a smaller --ctx)")
    chunks = [list(tokens[i:i + n_ctx]) for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if bos_id is not None:
        for c in chunks:
            c[0] = bos_id
    return chunks


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(base_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(base || model) at each position, from both rows of log-probabilities."""
    return (np.exp(base_logp) * (base_logp - logp)).sum(axis=-1)


def _scored(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities at the scored positions n_ctx/2 .. n_ctx-2 of a chunk's logits."""
    n = logits.shape[0]
    return log_softmax(logits[n // 2:n - 1])


def perplexity(model, tokens: list[int], n_ctx: int = 512, base=None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `model` (a diptych Model) on `tokens`, and KL against `base` if given.

    `progress(done_chunks, n_chunks)` is called after each chunk.
    """
    tok = model.tokenizer
    chunks = chunk_tokens(tokens, n_ctx, tok.bos_id if tok.add_bos else None)
    nll, kl, same, n = 0.0, 0.0, 0, 0
    for i, chunk in enumerate(chunks):
        logp = _scored(model.logits(chunk))
        targets = np.asarray(chunk[n_ctx // 2 + 1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        n += len(targets)
        if base is not None:
            base_logp = _scored(base.logits(chunk))
            if base_logp.shape != logp.shape:
                raise InvalidArgumentError("the base model's vocabulary differs from the model's")
            kl += float(kl_divergence(base_logp, logp).sum())
            same += int((base_logp.argmax(-1) == logp.argmax(-1)).sum())
        if progress:
            progress(i + 1, len(chunks))
    return PerplexityResult(float(np.exp(nll / n)), len(chunks), n,
                            kl / n if base is not None else None,
                            same / n if base is not None else None)
