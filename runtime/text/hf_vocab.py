"""A Hugging Face tokenizer folder as llama.cpp's `tokenizer.ggml.*` GGUF metadata.

Two kinds, as llama.cpp's converter writes them:
* SentencePiece (`tokenizer.model`): model "llama", tokens with scores and types, added and
  special tokens from added_tokens.json / tokenizer_config.json, the vocabulary padded to the
  model's vocab_size with `[PAD{i}]` tokens.
* byte-level BPE (`tokenizer.json` with a ByteLevel decoder): model "gpt2", tokens, merges
  and types; `tokenizer.ggml.pre` names the pre-tokenizer. llama.cpp identifies it by hashing
  the ids of a probe text; we compare the tokenizer.json's split regexes with the table that
  runtime/text/tokenizer.py runs (the same regexes llama.cpp runs), so no hash list is needed.

Special token ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab,
which reads them as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import SpecialVocab, TokenType

from diptych.errors import ModelFileError, UnsupportedModelError
from .tokenizer import _GPT2, _PRE_TOKENIZERS

__all__ = ["vocab_metadata", "read_json_object"]


def vocab_metadata(folder: Path, vocab_size: int, sentencepiece_first: bool) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata for the tokenizer files in `folder`. With both files,
    `sentencepiece_first` picks tokenizer.model (llama.cpp's choice differs per family)."""
    spm, bpe = folder / "tokenizer.model", folder / "tokenizer.json"
    if spm.is_file() and (sentencepiece_first or not bpe.is_file()):
        md = _sentencepiece(folder, spm, vocab_size)
        merges = False
    elif bpe.is_file():
        md = _byte_level_bpe(folder, vocab_size)
        merges = True
    else:
        raise ModelFileError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (folder / name).is_file() and not (merges and name == "tokenizer.json"):
            read_json_object(folder / name)  # SpecialVocab reads it, trusting its shape
    n_vocab = len(md["tokenizer.ggml.tokens"])
    special = SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    if merges:
        md["tokenizer.ggml.merges"] = list(special.merges)
    for kind, token_id in special.special_token_ids.items():
        md[f"tokenizer.ggml.{_ID_KEYS.get(kind, kind)}_token_id"] = int(token_id)
    for kind, flag in special.add_special_token.items():
        md[f"tokenizer.ggml.add_{kind}_token"] = bool(flag)
    md.update(chat_template_metadata(special.chat_template))
    return md


def chat_template_metadata(template) -> dict[str, Any]:
    """A chat template as GGUF metadata, as gguf-py's writer stores it: a string is
    `tokenizer.chat_template`; a list of {name, template} (tokenizer_config.json's named
    templates) gives the one named "default" there, each other one as
    `tokenizer.chat_template.<name>` (name characters outside [A-Za-z0-9] as "_"), and
    their names as `tokenizer.chat_templates`."""
    if isinstance(template, str):
        return {"tokenizer.chat_template": template}
    out: dict[str, Any] = {}
    names: list[str] = []
    for choice in template if isinstance(template, list) else ():
        text = choice.get("template") if isinstance(choice, dict) else None
        name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", ""))) if text else ""
        if not isinstance(text, str) or not name:
            continue
        if name == "default":
            out["tokenizer.chat_template"] = text
        else:
            out[f"tokenizer.chat_template.{name}"] = text
            names += [name] if name not in names else []
    if names:
        out["tokenizer.chat_templates"] = names
    return out


_ID_KEYS = {"pad": "padding", "unk": "unknown", "sep": "seperator"}  # gguf-py's key spellings


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a dict)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: must hold a JSON object, not a {type(value).__name__}")
    return value


def _looks_special(text: str) -> bool:
    """llama.cpp's converter marks these added tokens as control tokens whatever their flags."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _sentencepiece(folder: Path, path: Path, vocab_size: int) -> dict[str, Any]:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedModelError(
            f"{path} is a SentencePiece model: install the `sentencepiece` package") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a SentencePiece model ({exc})") from None
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = np.full(vocab_size, -10000.0, dtype=np.float32)
    types = np.full(vocab_size, TokenType.UNUSED, dtype=np.int32)
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                    else TokenType.NORMAL)
    added = folder / "added_tokens.json"
    for text, i in (read_json_object(added).items() if added.is_file() else ()):
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, -1000.0, TokenType.USER_DEFINED
    config = folder / "tokenizer_config.json"
    decoder = read_json_object(config).get("added_tokens_decoder", {}) if config.is_file() else {}
    for key, entry in decoder.items():
        i, text = int(key), entry["content"]
        if i >= vocab_size:
            continue
        if entry.get("special") or _looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types}


def _byte_level_bpe(folder: Path, vocab_size: int) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    tj = read_json_object(path)
    model, decoder = tj.get("model"), tj.get("decoder")
    if not (isinstance(model, dict) and isinstance(decoder, dict) and model.get("type") == "BPE"
            and decoder.get("type") == "ByteLevel"):
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE tokenizer.json files are supported (or a "
            "SentencePiece tokenizer.model)")
    vocab, added_list = model.get("vocab"), tj.get("added_tokens") or []
    if not (isinstance(vocab, dict) and isinstance(added_list, list)
            and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                    for t in added_list)):
        raise ModelFileError(f"{path}: model.vocab must map tokens to ids and added_tokens "
                             "must list {id, content} objects")
    added = {t.get("id"): t for t in added_list}
    limit = max(vocab_size, len(vocab) + len(added))  # ids past it would make a huge table
    if bad := [i for i in (*vocab.values(), *added) if type(i) is not int or not 0 <= i < limit]:
        raise ModelFileError(f"{path}: token id {bad[0]!r:.40} is not an integer in "
                             f"[0, {limit})")
    size = max(vocab_size, max(vocab.values(), default=-1) + 1, max(added, default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = np.full(size, TokenType.UNUSED, dtype=np.int32)
    for text, i in vocab.items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for i, entry in added.items():
        text = entry["content"]
        if entry.get("special") or _looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = TokenType.USER_DEFINED
        tokens[i] = text
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer(tj, path),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def _split_regexes(pre: dict | None, path: Path) -> list[str]:
    """The regex passes a tokenizer.json pre-tokenizer applies, in order."""
    if not pre:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        return [p for step in pre["pretokenizers"] for p in _split_regexes(step, path)]
    if kind == "Split":
        pattern = pre["pattern"]
        return [pattern.get("Regex", pattern.get("String"))]
    if kind == "ByteLevel":
        return [_GPT2] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    raise UnsupportedModelError(f"{path}: pre-tokenizer {kind!r} is not supported")


def _pre_tokenizer(tj: dict, path: Path) -> str:
    passes = tuple(_split_regexes(tj.get("pre_tokenizer"), path))
    ignore_merges = bool(tj["model"].get("ignore_merges", False))
    names = [name for name, (p, _, _) in _PRE_TOKENIZERS.items() if p == passes]
    if not names:
        raise UnsupportedModelError(
            f"{path}: the pre-tokenizer (regexes {list(passes)}) is none of those diptych runs "
            "(runtime/text/tokenizer.py)")
    same = [n for n in names if _PRE_TOKENIZERS[n][1] == ignore_merges]
    return (same or names)[0]
