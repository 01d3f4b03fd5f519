"""A Hugging Face tokenizer folder as llama.cpp's `tokenizer.ggml.*` GGUF metadata.

Three kinds, as llama.cpp's converter writes them (the second with real scores where it writes
-1000 for every piece):
* SentencePiece (`tokenizer.model`): model "llama", tokens with scores and types, added and
  special tokens from added_tokens.json / tokenizer_config.json, the vocabulary padded to the
  model's vocab_size with `[PAD{i}]` tokens.
* SentencePiece converted to `tokenizer.json` alone (Llama 2, Mistral, Gemma repositories
  without tokenizer.model): the same "llama" vocabulary, scores from the Unigram pieces or
  from the BPE merge ranks.
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
    use_spm = spm.is_file() and (sentencepiece_first or not bpe.is_file())
    if use_spm:
        md = _sentencepiece(folder, spm, vocab_size)
        merges = False
    elif bpe.is_file():
        tj = read_json_object(bpe)
        merges = not _sentencepiece_style(tj)
        md = _byte_level_bpe(bpe, tj, vocab_size) if merges else _sentencepiece_json(bpe, tj,
                                                                                   vocab_size)
    else:
        raise ModelFileError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (folder / name).is_file() and (use_spm or name != "tokenizer.json"):
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
    pieces = [(sp.IdToPiece(i), sp.GetScore(i),
               TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
               else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
               else TokenType.NORMAL) for i in range(sp.vocab_size())]
    tokens, scores, types = _sentencepiece_table(pieces, vocab_size)
    added = folder / "added_tokens.json"
    for text, i in (read_json_object(added).items() if added.is_file() else ()):
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, -1000.0, TokenType.USER_DEFINED
    config = folder / "tokenizer_config.json"
    decoder = read_json_object(config).get("added_tokens_decoder", {}) if config.is_file() else {}
    _added_tokens(((int(k), e) for k, e in decoder.items()), tokens, scores, types)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types}


def _sentencepiece_table(pieces, vocab_size: int):
    """tokens, scores, types of `pieces` [(text, score, type)], padded to `vocab_size` with
    unused `[PAD{i}]` tokens as llama.cpp's converter pads them."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = np.full(vocab_size, -10000.0, dtype=np.float32)
    types = np.full(vocab_size, TokenType.UNUSED, dtype=np.int32)
    for i, (text, score, kind) in enumerate(pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = text, score, kind
    return tokens, scores, types


def _added_tokens(entries, tokens: list[str], scores, types) -> None:
    """Added tokens (id, {content, special}) over the table: control tokens when special
    (or looking special), else user-defined with their SentencePiece spaces as spaces."""
    for i, entry in entries:
        text = entry["content"]
        if i >= len(tokens):
            continue
        if entry.get("special") or _looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0


def _sentencepiece_style(tj: dict) -> bool:
    """A tokenizer.json converted from a SentencePiece model (Llama 2, Mistral, Gemma): a
    Unigram model, or BPE over '\u2581'-marked words without the byte-level decoder."""
    model, decoder = tj.get("model"), tj.get("decoder")
    if not isinstance(model, dict):
        return False
    return model.get("type") == "Unigram" or (
        model.get("type") == "BPE" and "\u2581" in json.dumps(decoder or {}, ensure_ascii=False)
        and not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"))


def _sentencepiece_json(path: Path, tj: dict, vocab_size: int) -> dict[str, Any]:
    """A SentencePiece vocabulary from tokenizer.json alone. A Unigram model lists its
    pieces' scores; for BPE the score of a merged token is minus the rank of the merge that
    makes it, so merging by best score (llama.cpp's SentencePiece algorithm) applies the
    merges in the order BPE does."""
    model = tj["model"]
    try:
        if model["type"] == "Unigram":
            entries = [(str(text), float(score)) for text, score in model["vocab"]]
        else:
            vocab = sorted(((i, text) for text, i in model["vocab"].items()))
            if [i for i, _ in vocab] != list(range(len(vocab))):
                raise ValueError("model.vocab ids are not 0..n-1")
            rank: dict[str, int] = {}
            for r, merge in enumerate(model.get("merges") or []):
                left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
                rank.setdefault(left + right, r)
            entries = [(text, -float(rank.get(text, len(rank)))) for _, text in vocab]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: a SentencePiece-style model of an unexpected shape "
                             f"({type(exc).__name__}: {exc})") from None
    unk = model.get("unk_token") if model["type"] == "BPE" else None
    unk_id = model.get("unk_id") if model["type"] == "Unigram" else None
    pieces = [(text, score,
               TokenType.UNKNOWN if text == unk or i == unk_id
               else TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text)
               else TokenType.NORMAL) for i, (text, score) in enumerate(entries)]
    tokens, scores, types = _sentencepiece_table(pieces, vocab_size)
    added = tj.get("added_tokens") or []
    if not all(isinstance(t, dict) and type(t.get("id")) is int
               and isinstance(t.get("content"), str) for t in added):
        raise ModelFileError(f"{path}: added_tokens must list {{id, content}} objects")
    _added_tokens(((t["id"], t) for t in added), tokens, scores, types)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": _prepends_space(tj)}


def _prepends_space(tj: dict) -> bool:
    """Whether the tokenizer puts a '\u2581' before the text: a Prepend normalizer (Llama 2's
    tokenizer.json) or a Metaspace pre-tokenizer that prepends."""
    normalizers = _steps(tj.get("normalizer"), "normalizers")
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    return (any(s.get("type") == "Prepend" for s in normalizers)
            or any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
                   for s in pre))


def _steps(node, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer, Sequences flattened."""
    if not isinstance(node, dict):
        return []
    inner = node.get(key)
    return [s for n in inner for s in _steps(n, key)] if isinstance(inner, list) else [node]


def _byte_level_bpe(path: Path, tj: dict, vocab_size: int) -> dict[str, Any]:
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
