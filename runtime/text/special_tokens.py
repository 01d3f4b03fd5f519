"""Special tokens split out of text before the vocabulary's model runs, as llama.cpp does
(`tokenizer_st_partition` in llama-vocab.cpp).

llama.cpp takes the control, unknown and user-defined tokens longest first (then by id) and
splits every occurrence of each out of the text not yet claimed, left to right; the text
left between them is tokenized fragment by fragment. Here the same order runs one token
length at a time, over only the positions where some special token could start and that
nothing has claimed yet: a vocabulary can have thousands of such tokens (Gemma 3: 6,414,
among them every run of up to 31 newlines or spaces), and a text of a million newlines
must not become 31 million candidate matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_C_SPACE = " \t\n\v\f\r"   # C's isspace(), which llama.cpp's rstrip uses
_TOKEN, _STRIPPED = 1, 2    # what claimed a character


class SpecialTokens:
    def __init__(self, tokens: Iterable[tuple[str, int, bool, bool]]):
        """tokens: (text, id, parse_special_only, rstrip) for each; parse_special_only marks
        control and unknown tokens (user-defined ones split out either way); rstrip drops the
        whitespace after the token (Phi-3's control tokens)."""
        self._by_length: dict[int, dict[str, int]] = {}
        self._gated: set[int] = set()
        self._rstrip: set[int] = set()
        first_chars: set[str] = set()
        for text, token, gated, rstrip in tokens:
            if not text:
                continue
            same_length = self._by_length.setdefault(len(text), {})
            if text in same_length:
                continue
            same_length[text] = token
            if gated:
                self._gated.add(token)
            if rstrip:
                self._rstrip.add(token)
            first_chars.add(text[0])
        self._lengths = sorted(self._by_length, reverse=True)
        self._starts = (re.compile("[" + "".join(map(re.escape, sorted(first_chars))) + "]")
                        if first_chars else None)

    def split(self, text: str, parse_special: bool) -> list[tuple[int, int, int | None]]:
        """(start, end, token id) for each special token found and (start, end, None) for
        each stretch of text between them, in order."""
        n = len(text)
        taken = bytearray(n)
        accepted = self._claim(text, parse_special, taken)
        if not accepted:
            return [(0, n, None)] if text else []
        accepted.sort()
        out: list[tuple[int, int, int | None]] = []
        pos = 0
        for start, stop, token in accepted:
            if start > pos:
                out.append((pos, start, None))
            out.append((start, stop, token))
            pos = stop
            while pos < n and taken[pos] == _STRIPPED:
                pos += 1
        if pos < n:
            out.append((pos, n, None))
        return out

    def _claim(self, text: str, parse_special: bool,
               taken: bytearray) -> list[tuple[int, int, int]]:
        """(start, stop, id) of every special token llama.cpp's order splits out of `text`;
        marks their characters (and whitespace an rstrip token drops) in `taken`."""
        if self._starts is None:
            return []
        n, gated = len(text), self._gated
        starts = [m.start() for m in self._starts.finditer(text)]
        accepted = []
        for length in self._lengths:
            if not starts:
                break
            same_length = self._by_length[length]
            hits = []
            for i in starts:   # a slice cut short by the end of the text matches nothing
                token = same_length.get(text[i:i + length])
                if token is not None and (parse_special or token not in gated):
                    hits.append((token, i))
            if not hits:
                continue
            hits.sort()   # by id, then left to right
            for token, i in hits:
                stop = i + length
                if any(taken[i:stop]):
                    continue
                taken[i:stop] = bytes([_TOKEN]) * length
                accepted.append((i, stop, token))
                if token in self._rstrip:
                    while stop < n and not taken[stop] and text[stop] in _C_SPACE:
                        taken[stop] = _STRIPPED
                        stop += 1
            starts = [i for i in starts if not taken[i]]
        return accepted
