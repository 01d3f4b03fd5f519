"""Special tokens split out of text before the vocabulary's model runs, as llama.cpp does
(`tokenizer_st_partition` in llama-vocab.cpp).

llama.cpp takes the control, unknown and user-defined tokens longest first and splits every
occurrence of each out of the text not yet claimed, left to right; the text left between
them is tokenized fragment by fragment. That equals collecting every occurrence of every such
token and accepting them in (longest, lowest id, leftmost) order when they overlap nothing
accepted before, which is how it is done here: a vocabulary can have thousands of them
(Gemma 3: 6,414), and only the few a text contains are ever looked at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_C_SPACE = " \t\n\v\f\r"   # C's isspace(), which llama.cpp's rstrip uses


class SpecialTokens:
    def __init__(self, tokens: Iterable[tuple[str, int, bool, bool]]):
        """tokens: (text, id, parse_special_only, rstrip) for each; parse_special_only marks
        control and unknown tokens (user-defined ones split out either way); rstrip drops the
        whitespace after the token (Phi-3's control tokens)."""
        self._ids: dict[str, int] = {}
        self._gated: set[int] = set()
        self._rstrip: set[int] = set()
        lengths: dict[str, set[int]] = {}
        for text, token, gated, rstrip in tokens:
            if not text or text in self._ids:
                continue
            self._ids[text] = token
            if gated:
                self._gated.add(token)
            if rstrip:
                self._rstrip.add(token)
            lengths.setdefault(text[0], set()).add(len(text))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._starts = (re.compile("[" + "".join(map(re.escape, sorted(lengths))) + "]")
                        if lengths else None)

    def split(self, text: str, parse_special: bool) -> list[tuple[int, int, int | None]]:
        """(start, end, token id) for each special token found and (start, end, None) for
        each stretch of text between them, in order."""
        found = self._occurrences(text, parse_special)
        if not found:
            return [(0, len(text), None)] if text else []
        found.sort()
        taken = bytearray(len(text))          # 1: claimed by a token, 2: stripped
        accepted = []
        for neg_len, token, start in found:
            stop = start - neg_len
            if any(taken[start:stop]):
                continue
            taken[start:stop] = b"\1" * (stop - start)
            accepted.append((start, stop, token))
            if token in self._rstrip:
                while stop < len(text) and not taken[stop] and text[stop] in _C_SPACE:
                    taken[stop] = 2
                    stop += 1
        accepted.sort()
        out: list[tuple[int, int, int | None]] = []
        pos = 0
        for start, stop, token in accepted:
            if start > pos:
                out.append((pos, start, None))
            out.append((start, stop, token))
            pos = stop
            while pos < len(text) and taken[pos] == 2:
                pos += 1
        if pos < len(text):
            out.append((pos, len(text), None))
        return out

    def _occurrences(self, text: str, parse_special: bool) -> list[tuple[int, int, int]]:
        """(-length, id, start) of every occurrence of every special token in `text`."""
        if self._starts is None:
            return []
        ids, gated, lengths = self._ids, self._gated, self._lengths
        found = []
        for m in self._starts.finditer(text):
            i = m.start()
            room = len(text) - i
            for n in lengths[text[i]]:
                if n > room:
                    continue
                token = ids.get(text[i:i + n])
                if token is not None and (parse_special or token not in gated):
                    found.append((-n, token, i))
        return found
