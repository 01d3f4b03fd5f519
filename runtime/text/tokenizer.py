"""The tokenizer a GGUF file describes, matching llama.cpp.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, the merges (or the scores) and
the special token ids as metadata under llama.cpp's key names. `Tokenizer.from_gguf_metadata`
reads that mapping (any `Mapping[str, value]`, e.g. `diptych.quant.gguf_file.GGUFFile(p).metadata`)
and gives the same ids as llama.cpp's `llama_tokenize` (checked by
tests/runtime/test_tokenizer.py against fixtures written by llama-cpp-python).

Control (3), unknown (2) and user-defined (4) tokens are split out of the text first, as
llama.cpp's `tokenizer_st_partition` does (special_tokens.py): control/unknown ones only when
`parse_special=True`, user-defined ones always. Each fragment of text between them then goes
through the vocabulary's model; two kinds are supported, chosen by `tokenizer.ggml.model`:

* ``gpt2`` -- byte-level BPE (SmolLM2, Qwen2.5, Llama 3, ...), in Hugging Face `tokenizers`.
  Text is split by the regexes llama.cpp picks from `tokenizer.ggml.pre` (table
  `_PRE_TOKENIZERS` below), mapped to the GPT-2 byte alphabet, then merged by merge rank. A
  pre-tokenizer name not in the table falls back to the plain GPT-2 regex, with a warning
  (llama.cpp refuses such files outright).
* ``llama`` -- SentencePiece (Gemma 3, Llama 2, Mistral v0.1, ...), llama.cpp's merge-by-score
  rule over the whole fragment (spm.py), with spaces written as U+2581 and <0xNN> byte tokens
  for characters not in the vocabulary.

Checked against llama.cpp: the 'smollm' and 'qwen2' pre-tokenizers and SentencePiece (Gemma 3),
on the fixture corpus and on 12,000 random strings per model, and SentencePiece with a space
prefix on a tiny vocabulary llama.cpp's converter wrote; the other table entries follow
llama.cpp's source but have no real model in the tests.

Known differences from llama.cpp (none is hit by the test corpus):
* code points assigned only in recent Unicode versions (e.g. U+13460.. Egyptian Hieroglyphs
  Extended-A, Unicode 16) have different categories in llama.cpp's tables and in the regex
  engine of `tokenizers`, so text around them can be split differently (byte-level BPE only);
* where two special tokens of the same length overlap in the text, the lower id wins here;
  llama.cpp's order among them is whatever its unstable sort left;
* `decode` never applies llama.cpp's `clean_spaces` pass (which deletes the space in " ," and
  " 's" for some BPE pre-tokenizers): our decode is the exact concatenation of `token_bytes`, so
  it agrees with the streaming detokenizer and round-trips text.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from diptych.errors import ModelFileError, TokenizerError, UnsupportedModelError
from diptych.gc_pause import gc_paused
from diptych.quant.gguf_file import GGUFMetadata

from .special_tokens import SpecialTokens
from .spm import SentencePiece

log = logging.getLogger(__name__)

__all__ = ["Tokenizer", "TokenizerError", "bytes_to_unicode"]


# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # SentencePiece's visible space, '▁'

# --- pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe uses them (src/llama-vocab.cpp) ---
# llama.cpp runs the GPT-2 pattern without the final "|\s+" through a hand-written matcher that
# behaves as the full pattern does; we give the full pattern to the regex engine.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT for a BPE vocabulary (four passes)
_BPE_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")

# name -> (regex passes, ignore_merges, add_bos default).  Each pass splits every piece the
# previous one left, keeping the text between matches as pieces too (llama.cpp's
# unicode_regex_split == tokenizers' Split(behavior="isolated")).
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {}


def _register(names: Iterable[str], passes: Sequence[str], ignore_merges=False, add_bos=False):
    for name in names:
        _PRE_TOKENIZERS[name] = (tuple(passes), ignore_merges, add_bos)


_register(["default"], _BPE_DEFAULT)
_register(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "jina-es",
           "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert",
           "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4"], [_GPT2])
_register(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
           "mellum2"], [r"\p{N}", _GPT2])
_register(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
           "lfm2", "jina-v5-nano"], [_LLAMA3], ignore_merges=True, add_bos=True)
_register(["dbrx", "smaug-bpe", "chatglm-bpe"], [_LLAMA3])
_register(["glm4", "glm5"], [_LLAMA3], ignore_merges=True)
_register(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
           "solar-open", "grok-2"], [_QWEN2])
_register(["qwen35"], [_QWEN35])
_register(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], [_GPT4O])
_register(["tekken"], [_TEKKEN], ignore_merges=True, add_bos=True)
_register(["falcon"], _FALCON)
_FALLBACK_PRE = "gpt-2"

# Token texts llama.cpp treats as end-of-generation, whatever their type (llama-vocab.cpp,
# "maintain a list of tokens that cause end-of-generation"); such a token is forced to CONTROL.
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
])
# Fill-in-the-middle pad / repo / file-separator tokens are end-of-generation too when the file
# does not name them (llama.cpp auto-detects them by text).
_FIM_EOG = {
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                        "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte with one)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate table: byte-level character -> the character whose code point is that byte,
# so `token.translate(_CHAR_TO_LATIN1).encode("latin-1")` gives the token's raw bytes.
_CHAR_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}


def _get(md: Mapping[str, Any], key: str, default=None):
    try:
        value = md[key]
    except KeyError:
        return default
    return default if value is None else value


def _as_str(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unicode(text: str) -> None:
    """Text with a lone surrogate (e.g. "\\ud800", from a broken decode) is not Unicode text and
    has no UTF-8 form: say where it is instead of letting the tokenizer library fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"the text is not valid Unicode: lone surrogate "
                             f"U+{ord(text[e.start]):04X} at character {e.start}") from None


def _as_id(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = _get(md, key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        log.warning("%s = %d is outside the vocabulary (%d tokens); ignored", key, value, n_vocab)
        return None
    return value


class Tokenizer:
    """Text <-> token ids for one GGUF model, as llama.cpp tokenizes it.

    Build it with `Tokenizer.from_gguf_metadata(metadata)`.
    """

    def __init__(self, *, encoder, special: SpecialTokens, kind: str, pre: str | None,
                 tokens: list[str], vocab: dict[str, int], token_types: np.ndarray,
                 bos_id: int | None, eos_id: int | None, eot_id: int | None,
                 eom_id: int | None, pad_id: int | None,
                 unk_id: int | None, eog_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, chat_template: str | None):
        self._encoder = encoder               # tokenizers.Tokenizer (BPE) or SentencePiece
        self._special = special
        self._vocab = vocab
        self.kind = kind                      # "bpe" (byte-level) or "spm"
        self.pre = pre
        self._tokens = tokens
        self._types = token_types
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.pad_id, self.unk_id = pad_id, unk_id
        self.eog_ids = eog_ids
        self.add_bos = add_bos                # the model's rule: encode(..., add_bos=None)
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self._pieces: list[bytes | None] = [None] * len(tokens)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata (a mapping of key -> decoded value)."""
        with gc_paused():   # ~10^5 strings: the cyclic GC would rescan the heap many times
            return cls._build(metadata)

    @classmethod
    def _build(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        md = metadata
        model = _get(md, "tokenizer.ggml.model")
        if model is None:
            raise ModelFileError("the GGUF metadata has no tokenizer (tokenizer.ggml.model)")
        model = _as_str(model)
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer.ggml.model = {model!r} is not supported (supported: 'gpt2' byte-level "
                f"BPE, 'llama' SentencePiece)")
        raw_tokens = _get(md, "tokenizer.ggml.tokens")
        if raw_tokens is None or len(raw_tokens) == 0:
            raise ModelFileError("the GGUF metadata has no vocabulary (tokenizer.ggml.tokens)")
        tokens = list(raw_tokens)
        if not isinstance(tokens[0], str):
            tokens = [_as_str(t) for t in tokens]
        n_vocab = len(tokens)
        if not all(tokens):               # llama.cpp renames empty tokens the same way
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types_raw = _get(md, "tokenizer.ggml.token_type")
        if types_raw is None:
            types = np.full(n_vocab, NORMAL, dtype=np.int32)
        else:
            types = np.asarray(types_raw, dtype=np.int32)[:n_vocab].copy()
            if len(types) < n_vocab:
                raise ModelFileError("tokenizer.ggml.token_type is shorter than the vocabulary")
        vocab = dict(zip(tokens, range(n_vocab)))
        if len(vocab) != n_vocab:
            raise ModelFileError("the vocabulary (tokenizer.ggml.tokens) has duplicate tokens")

        kind = "bpe" if model == "gpt2" else "spm"
        pre = _get(md, "tokenizer.ggml.pre")
        pre = _as_str(pre) if pre is not None else None

        bos_id = _as_id(md, "tokenizer.ggml.bos_token_id", n_vocab)
        eos_id = _as_id(md, "tokenizer.ggml.eos_token_id", n_vocab)
        eot_id = _as_id(md, "tokenizer.ggml.eot_token_id", n_vocab)
        eom_id = _as_id(md, "tokenizer.ggml.eom_token_id", n_vocab)
        pad_id = _as_id(md, "tokenizer.ggml.padding_token_id", n_vocab)
        unk_id = _as_id(md, "tokenizer.ggml.unknown_token_id", n_vocab)

        # ---- end-of-generation set and llama.cpp's attribute fix-ups (llama-vocab.cpp load())
        eog: set[int] = set()
        for text in _EOG_TEXTS:
            i = vocab.get(text)
            if i is not None:
                eog.add(i)
                if types[i] != CONTROL:
                    types[i] = CONTROL
        if eot_id is None:
            for text in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
                         "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>"):
                if text in vocab:
                    eot_id = vocab[text]
                    break
        if eom_id is None and "<|eom_id|>" in vocab:
            eom_id = vocab["<|eom_id|>"]
        for key, texts in _FIM_EOG.items():
            fim_id = _as_id(md, key, n_vocab)
            if fim_id is None:
                fim_id = next((vocab[t] for t in texts if t in vocab), None)
                if fim_id is not None:
                    types[fim_id] = CONTROL
            if fim_id is not None:
                eog.add(fim_id)
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            if text in vocab:
                types[vocab[text]] = USER_DEFINED
        for i in (eos_id, eot_id, eom_id):
            if i is not None:
                eog.add(i)
        texts_in_eog = {tokens[i] for i in eog}
        has_call = bool(texts_in_eog & {"<|call|>", "<|calls|>"})   # gpt-oss, solar-open
        if has_call and "<|end|>" in texts_in_eog and texts_in_eog & {"<|return|>", "<|flush|>"}:
            end = vocab["<|end|>"]
            eog.discard(end)
            types[end] = USER_DEFINED
        if "</s>" in texts_in_eog and texts_in_eog & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(vocab["</s>"])
            types[vocab["</s>"]] = NORMAL

        # ---- BOS / EOS / space-prefix rules
        add_space_prefix = False
        if kind == "bpe":
            if pre is None:
                log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' "
                            "pre-tokenizer (generation quality may suffer)")
                pre_name = "default"
            elif pre in _PRE_TOKENIZERS:
                pre_name = pre
            else:
                log.warning("unknown tokenizer.ggml.pre %r: falling back to the GPT-2 byte-level "
                            "pre-tokenizer; token ids may differ from the model's own tokenizer",
                            pre)
                pre_name = _FALLBACK_PRE
            passes, ignore_merges, add_bos = _PRE_TOKENIZERS[pre_name]
        else:
            passes, ignore_merges, add_bos = (), False, True
            add_space_prefix = True
        add_eos = False
        add_space_prefix = bool(_get(md, "tokenizer.ggml.add_space_prefix", add_space_prefix))
        add_bos = bool(_get(md, "tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(_get(md, "tokenizer.ggml.add_eos_token", add_eos))
        if add_bos and bos_id is None:
            log.warning("the tokenizer asks for a BOS token but names none; no BOS is added")
            add_bos = False
        if add_eos and eos_id is None:
            add_eos = False

        # ---- the vocabulary's model: byte-level BPE in `tokenizers`, SentencePiece in spm.py
        if kind == "bpe":
            from tokenizers import Regex, models, pre_tokenizers
            from tokenizers import Tokenizer as HFTokenizer

            # the merges live on in `tokenizers`' model: a GGUF's decoded copy is not kept
            raw_merges = (md.take("tokenizer.ggml.merges")
                          if isinstance(md, GGUFMetadata) and "tokenizer.ggml.merges" in md
                          else _get(md, "tokenizer.ggml.merges"))
            if raw_merges is None:
                raise ModelFileError("a byte-level BPE vocabulary needs tokenizer.ggml.merges")
            raw_merges = list(raw_merges)
            if raw_merges and not isinstance(raw_merges[0], str):
                raw_merges = [_as_str(m) for m in raw_merges]
            merges = list(map(tuple, map(str.split, raw_merges, repeat(" "), repeat(1))))
            # A token that is not valid UTF-8 arrives with surrogate escapes (GGUFFile decodes
            # with errors="surrogateescape"). No UTF-8 text can produce it, and Rust strings
            # cannot hold it: `tokenizers` gets a placeholder, token_bytes the original bytes.
            hf_vocab = vocab
            try:
                "".join(tokens).encode("utf-8")
            except UnicodeEncodeError:
                hf_vocab = {t if _utf8_ok(t) else f"<diptych:not-utf8:{i}>": i
                            for i, t in enumerate(tokens)}
            try:
                bpe = models.BPE(vocab=hf_vocab, merges=merges, ignore_merges=ignore_merges)
            except Exception:   # a merge naming a token the vocabulary lacks (or not UTF-8)
                good = [m for m in merges if len(m) == 2 and m[0] in hf_vocab
                        and m[1] in hf_vocab and m[0] + m[1] in hf_vocab]
                log.warning("dropped %d malformed merges of %d", len(merges) - len(good),
                            len(merges))
                bpe = models.BPE(vocab=hf_vocab, merges=good, ignore_merges=ignore_merges)
            encoder = HFTokenizer(bpe)
            splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in passes]
            encoder.pre_tokenizer = pre_tokenizers.Sequence(
                splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            scores_raw = _get(md, "tokenizer.ggml.scores")
            scores = (np.zeros(n_vocab, dtype=np.float32) if scores_raw is None
                      else np.asarray(scores_raw, dtype=np.float32)[:n_vocab])
            byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
            # float32 per id, read as Python floats: a list of them would hold 32 bytes an id
            encoder = SentencePiece(vocab, array("f", scores.tobytes()), byte_ids, unk_id)

        # ---- special tokens: split out of the text before the model runs
        name = _as_str(_get(md, "general.name", "")).lower()
        rstrip = "phi-3" in name or "phi3" in name     # llama.cpp's Phi-3 attribute fix-up
        special = SpecialTokens(
            (tokens[i], int(i), types[i] != USER_DEFINED,
             rstrip and types[i] != USER_DEFINED and tokens[i] not in ("<unk>", "<s>",
                                                                      "<|endoftext|>"))
            for i in np.nonzero((types == CONTROL) | (types == UNKNOWN)
                                | (types == USER_DEFINED))[0])

        template = _get(md, "tokenizer.chat_template")
        return cls(encoder=encoder, special=special, kind=kind, pre=pre, tokens=tokens,
                   vocab=vocab, token_types=types, bos_id=bos_id, eos_id=eos_id, eot_id=eot_id,
                   eom_id=eom_id, pad_id=pad_id,
                   unk_id=unk_id, eog_ids=frozenset(eog), add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_space_prefix,
                   chat_template=_as_str(template) if template is not None else None)

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token(self) -> str:
        """The BOS token's text ('' if none), as chat templates expect `bos_token`."""
        return self._tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self._tokens[self.eos_id] if self.eos_id is not None else ""

    @property
    def strips_leading_space(self) -> bool:
        """True when `decode` drops the space the tokenizer put before the text (SentencePiece
        with add_space_prefix); a streaming detokenizer must do the same to its first piece."""
        return self.kind == "spm" and self.add_space_prefix

    def token_type(self, token_id: int) -> int:
        """llama.cpp's token type after its fix-ups: 1 normal, 2 unknown, 3 control,
        4 user-defined, 5 unused, 6 byte."""
        return int(self._types[self._check(token_id)])

    def is_special(self, token_id: int) -> bool:
        """A control or unknown token: hidden by `decode(..., skip_special=True)`."""
        return self.token_type(token_id) in (CONTROL, UNKNOWN)

    def id_to_token(self, token_id: int) -> str:
        """The token as the vocabulary spells it (byte-level or '▁' forms)."""
        return self._tokens[self._check(token_id)]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def _check(self, token_id: int) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise TokenizerError(f"a token id must be an int, not {token_id!r}")
        token_id = int(token_id)
        if not 0 <= token_id < len(self._tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary "
                                 f"(0..{len(self._tokens) - 1})")
        return token_id

    # ---------------------------------------------------------------- encode
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize` gives them.

        add_bos: None follows the model (tokenizer.ggml.add_bos_token, else llama.cpp's default
            for the vocabulary); True/False forces it.
        parse_special: True matches control tokens written in the text (e.g. "<|im_start|>" in
            a rendered chat template) as single ids; False tokenizes them as plain text.
            User-defined tokens are matched either way, as in llama.cpp.
        add_eos: append EOS (off by default even for models whose metadata asks for it, since a
            prompt for generation must not end in EOS; pass `tok.add_eos` to follow the model).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to tokenize must be a str, not {type(text).__name__}")
        if add_bos is None:
            add_bos = self.add_bos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("this vocabulary has no BOS token")
            out.append(self.bos_id)
        if text:
            out.extend(self._encode(text, parse_special)[0])
        if add_eos:
            if self.eos_id is None:
                raise TokenizerError("this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _encode(self, text: str, parse_special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no BOS/EOS) and each id's character range in it: special tokens
        split out first, then each fragment between them through the vocabulary's model."""
        _check_unicode(text)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        after_special = True
        for start, end, token in self._special.split(text, parse_special):
            if token is not None:
                ids.append(token)
                offsets.append((start, end))
                after_special = True
                continue
            fragment = text[start:end]
            if self.kind == "bpe":
                enc = self._encoder.encode(fragment, add_special_tokens=False)
                ids.extend(enc.ids)
                offsets.extend((start + a, start + b) for a, b in enc.offsets)
            else:
                # llama.cpp's rule: a space before the text and after every special token
                shift = int(self.add_space_prefix and after_special)
                spelled = SPACE_MARK * shift + fragment.replace(" ", SPACE_MARK)
                frag_ids, frag_offsets = self._encoder.encode(spelled)
                ids.extend(frag_ids)
                offsets.extend((start + max(a - shift, 0), start + max(b - shift, 0))
                               for a, b in frag_offsets)
            after_special = False
        return ids, offsets

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a rendered template (control tokens recognised, no BOS added) and
        each token's character range in `text`."""
        return self._encode(text, True)

    def has_special(self, text: str) -> bool:
        """True when `text` spells a control or unknown token (e.g. "<|im_start|>")."""
        return any(self._types[i] in (CONTROL, UNKNOWN) for i in self._encode(text, True)[0])

    def encode_template(self, text: str, content: Sequence[tuple[int, int]]) -> list[int]:
        """Token ids of a rendered chat template (no BOS added: templates write their own),
        with control tokens recognised only outside the `content` spans (character ranges of
        message text): a message that spells "<|im_start|>system" gets it as plain text.

        Control tokens split the text before the model runs, so tokenizing the pieces between
        the template's own control tokens gives the same ids as one pass would, apart from the
        text that spelled a token inside a message."""
        ids, offsets = self._encode(text, True)
        cuts = []   # (start, end, id) of each control token the template itself wrote
        injected = False
        for i, (s, e) in zip(ids, offsets):
            if self._types[i] in (CONTROL, UNKNOWN):
                if any(a < e and s < b for a, b in content):
                    injected = True
                else:
                    cuts.append((s, e, i))
        if not injected:
            return ids
        out: list[int] = []
        pos = 0
        for s, e, i in cuts:
            if s > pos:
                out.extend(self._encode(text[pos:s], False)[0])
            out.append(i)
            pos = e
        if pos < len(text):
            out.extend(self._encode(text[pos:], False)[0])
        return out

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, parse_special=parse_special) for t in texts]

    # ---------------------------------------------------------------- decode
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (llama.cpp's token_to_piece with
        special=True): byte-level characters mapped back to bytes, '▁' -> ' ', <0xNN> -> one
        byte, control/user-defined tokens as their text, unused tokens as b''.
        Concatenating these for a sequence gives its UTF-8 text (before the leading-space strip
        of `strips_leading_space`)."""
        piece = self._pieces[self._check(token_id)]
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, i: int) -> bytes:
        text, kind = self._tokens[i], self._types[i]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if kind == BYTE:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return bytes([int(text[3:5], 16)])
            return text.encode("utf-8", "surrogateescape")   # spelled as itself
        if kind == NORMAL:
            if self.kind == "spm":
                return text.replace(SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            try:
                return text.translate(_CHAR_TO_LATIN1).encode("latin-1")
            except UnicodeEncodeError:   # a character outside the byte alphabet: keep it
                return b"".join(bytes([_CHAR_TO_LATIN1[ord(c)]]) if ord(c) in _CHAR_TO_LATIN1
                                else c.encode("utf-8", "surrogateescape") for c in text)
        return b""                        # unused / undefined tokens render as nothing

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The bytes of `ids` (see `decode`)."""
        parts = []
        strip = self.strips_leading_space
        for i in ids:
            i = self._check(i)
            if self._types[i] in (CONTROL, UNKNOWN):
                if not skip_special:
                    parts.append(self.token_bytes(i))
                continue
            piece = self.token_bytes(i)
            if strip:   # the first text token carries the space the tokenizer prefixed
                strip = False
                if piece.startswith(b" "):
                    piece = piece[1:]
            parts.append(piece)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`: the concatenated `token_bytes`, decoded as UTF-8 (an incomplete or
        invalid sequence becomes U+FFFD).

        skip_special: leave out control and unknown tokens (BOS, EOS, <|im_start|>, ...).
        With a SentencePiece vocabulary that adds a space prefix, the one space the tokenizer
        put before the text is removed from the first text token when nothing but special
        tokens precede it (so decode(encode(x)) == x)."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def to_tokenizer_json(self) -> str:
        """This byte-level BPE vocabulary as a Hugging Face tokenizer.json, for tools that read
        one (benchmarks/bench_mlx.py); special tokens become `tokenizers`' added tokens, which
        match leftmost-first where llama.cpp's longest-first split (ours) could differ."""
        from tokenizers import AddedToken, decoders
        from tokenizers import Tokenizer as HFTokenizer

        if self.kind != "bpe":
            raise TokenizerError("only a byte-level BPE vocabulary converts to tokenizer.json")
        out = HFTokenizer.from_str(self._encoder.to_str())
        out.decoder = decoders.ByteLevel()
        kinds = {CONTROL: True, UNKNOWN: True, USER_DEFINED: False}
        out.add_tokens([AddedToken(t, special=kinds[k], normalized=False)
                        for t, k in zip(self._tokens, self._types.tolist()) if k in kinds])
        return out.to_str()

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            template: str | None = None, **extra) -> str:
        """Render `messages` with the model's chat template (or `template`, or the ChatML
        fallback when the file has none); see `diptych.text.chat_template.render_chat`."""
        from diptych.text.chat_template import render_chat

        if template is None and self.chat_template is not None \
                and not _utf8_ok(self.chat_template):
            raise ModelFileError("the model's chat template (tokenizer.chat_template) is not "
                                 "valid UTF-8; pass a template of your own")
        return render_chat(template or self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, eog={sorted(self.eog_ids)})")
