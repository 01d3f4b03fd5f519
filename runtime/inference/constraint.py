"""Constrained decoding: output that always parses as JSON and validates against a schema
(`JsonConstraint`), or follows any llguidance grammar (`GrammarConstraint`; the server's
tool calls, server/tool_grammar.py).

The grammar engine is llguidance (the `[server]` extra): it compiles a JSON schema (or a
lark grammar) to a grammar over the model's own vocabulary and, at each step, says which
tokens may come next.
That set reaches the sampler as its `mask` (applied on the device before anything else sees
the logits); the drawn token advances the grammar. Once the value is complete only the
end-of-generation tokens are allowed, so generation ends there.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from diptych.errors import InvalidArgumentError, MissingDependencyError


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MissingDependencyError("constrained decoding (json_schema) needs llguidance: "
                                     "pip install 'diptych[server]'") from None
    return llguidance


class _Vocabulary:
    """llguidance's view of a diptych tokenizer (its `TokenizerWrapper` protocol): each id's
    bytes, control tokens marked with a 0xff prefix so no grammar spells them, and the
    tokenizer itself for the strings llguidance needs tokenized."""

    def __init__(self, tokenizer, n_vocab: int):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size)
                                  if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (n_vocab - len(self.tokens))   # ids the model has, unnamed
        self.is_tokenizer_wrapper = True
        self._by_bytes: dict[bytes, int] | None = None   # token bytes -> id, built on first need

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not self._tok.strips_leading_space:
            return self._tok.encode(text, add_bos=False, parse_special=False)
        # SentencePiece with add_space_prefix puts a space before the text, and llguidance needs
        # tokens that spell exactly `text`: drop that space from the first token and spell the
        # rest of that token from the vocabulary (longest match first).
        ids = self._tok.encode(text, add_bos=False, parse_special=False)
        first = self._tok.token_bytes(ids[0]) if ids else b""
        if not first.startswith(b" "):
            return ids
        return self._spell(first[1:]) + ids[1:]

    def _spell(self, data: bytes) -> list[int]:
        if self._by_bytes is None:
            self._by_bytes = {}
            for i, b in enumerate(self.tokens):
                if b and not b.startswith(b"\xff"):
                    self._by_bytes.setdefault(b, i)
        longest = max(map(len, self._by_bytes))
        out, pos = [], 0
        while pos < len(data):
            for end in range(min(len(data), pos + longest), pos, -1):
                if data[pos:end] in self._by_bytes:
                    out.append(self._by_bytes[data[pos:end]])
                    pos = end
                    break
            else:
                raise InvalidArgumentError(f"the vocabulary cannot spell {data!r}")
        return out


@lru_cache(maxsize=4)
def _lltokenizer(tokenizer, n_vocab: int):
    llg = _llguidance()
    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer, n_vocab)),
                           n_vocab=n_vocab, eos_token=sorted(tokenizer.eog_ids))


def lark_grammar(text: str) -> str:
    """An llguidance grammar from lark syntax (checked when a GrammarConstraint is built)."""
    return _llguidance().LLMatcher.grammar_from_lark(text)


class GrammarConstraint:
    """The state of one generation in an llguidance grammar (`grammar`: what
    `LLMatcher.grammar_from_*` gives): `mask(backend)` before each draw, `advance` with the
    drawn token. `what` names the grammar's source in errors."""

    def __init__(self, tokenizer, n_vocab: int, grammar: str, what: str):
        llg = _llguidance()
        self.n_vocab = n_vocab
        self._last: tuple[bytes, object] = (b"", None)   # the last mask: packed, on the device
        self.matcher = llg.LLMatcher(_lltokenizer(tokenizer, n_vocab), grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidArgumentError(f"{what} is not usable: {self.matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a bool array (n_vocab,)."""
        return self._unpack(self.matcher.compute_bitmask())

    def _unpack(self, packed: bytes) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
        return bits[:self.n_vocab].astype(bool)

    def mask(self, backend):
        """The tokens allowed next, as a device bool array (1, n_vocab). A mask the same as
        the last one (free text under a tool grammar: every step) is not sent again."""
        packed = self.matcher.compute_bitmask()
        if packed != self._last[0]:
            self._last = (packed, device_mask(backend, self._unpack(packed)[None]))
        return self._last[1]

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):   # the mask allowed it: a bug, not input
            raise RuntimeError(f"the grammar refused token {token} that its mask allowed: "
                               f"{self.matcher.get_error()}")

    def rollback(self, n: int) -> None:
        """Forget the last n tokens advanced through."""
        if n and not self.matcher.rollback(n):
            raise RuntimeError(f"the grammar could not roll back {n} tokens: "
                               f"{self.matcher.get_error()}")


# JSON without whitespace between tokens, as OpenAI's structured outputs are: llguidance's
# default admits any run of whitespace there, which a weak model can pad until max_tokens
COMPACT = {"whitespace_flexible": False}


def compact(schema: dict | bool) -> dict | bool:
    """`schema` with compact JSON as its default layout (its own "x-guidance" wins)."""
    if schema is True:
        schema = {}
    guidance = schema.get("x-guidance", {}) if isinstance(schema, dict) else None
    if not isinstance(guidance, dict):
        return schema   # false, or options llguidance will refuse
    return {**schema, "x-guidance": {**COMPACT, **guidance}}


class JsonConstraint(GrammarConstraint):
    """Output that is one JSON value following `schema`, compact unless the schema's
    "x-guidance" says otherwise."""

    def __init__(self, tokenizer, n_vocab: int, schema: dict | bool):
        llg = _llguidance()
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgumentError(f"json_schema must be a JSON schema (a dict), not "
                                       f"{type(schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(compact(schema)))
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"json_schema is not usable: {exc}") from None
        super().__init__(tokenizer, n_vocab, grammar, "json_schema")


def device_mask(backend, allowed: np.ndarray):
    """Rows of allowed tokens (R, V) as the sampler's device bool mask."""
    return backend.ids(allowed.astype(np.uint8)) > 0
