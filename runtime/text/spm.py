"""SentencePiece tokenization as llama.cpp does it (its `llm_tokenizer_spm_session`).

llama.cpp does not run SentencePiece itself: over a whole text fragment (no word
splitting; spaces already written as U+2581) it repeatedly merges the adjacent pair of
symbols whose concatenation is a vocabulary token with the best score (ties: the leftmost
pair), until no adjacent pair forms a token. A symbol left that is not a token (a
character outside the vocabulary) becomes its UTF-8 bytes, as <0xNN> tokens.

Written here rather than with `tokenizers`: its BPE model expresses this rule only as a
ranked list of every split of every token (Gemma 3: 515k merges), and building that model
took most of a large vocabulary's load (BENCHMARKS.md); this needs only the vocabulary and
its scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from heapq import heappop, heappush

from diptych.errors import TokenizerError


class SentencePiece:
    """Text fragment -> token ids and character ranges, by llama.cpp's merge rule."""

    def __init__(self, vocab: dict[str, int], scores: Sequence[float], byte_ids: list[int | None],
                 unk_id: int | None):
        self._vocab = vocab              # token text -> id
        self._scores = scores            # per id
        self._byte_ids = byte_ids        # byte value -> id of its <0xNN> token (None: absent)
        self._unk_id = unk_id

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (already in the vocabulary's spelling: spaces as U+2581) and each
        id's [start, end) character range in it; a character spelled by byte tokens gives
        each of them its own range."""
        n = len(text)
        if n == 0:
            return [], []
        vocab, scores = self._vocab, self._scores
        # the alive symbols tile the text: symbol i spans text[i:end[i]], so the next one
        # starts at end[i]; prev[i] is where the one before starts. A dead symbol has
        # end[i] == i.
        end = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        heap: list[tuple[float, int, int]] = []   # (-score, left, merged length)

        def push(left: int, right: int) -> None:
            token = vocab.get(text[left:end[right]])
            if token is not None:
                heappush(heap, (-scores[token], left, end[right] - left))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, size = heappop(heap)
            right = end[left]
            # stale: the left symbol was merged away, or either side has grown since
            if right == left or right == n or end[right] - left != size:
                continue
            end[left] = end[right]
            end[right] = right                 # dead
            after = end[left]
            if after < n:
                prev[after] = left
                push(left, after)
            if prev[left] >= 0:
                push(prev[left], left)

        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        i = 0
        while i < n:
            piece = text[i:end[i]]
            token = vocab.get(piece)
            if token is not None:
                ids.append(token)
                offsets.append((i, end[i]))
            else:   # one character the vocabulary lacks (merges only ever form tokens)
                for byte in piece.encode("utf-8", "surrogateescape"):
                    ids.append(self._byte_token(byte, piece))
                    offsets.append((i, end[i]))
            i = end[i]
        return ids, offsets

    def _byte_token(self, byte: int, piece: str) -> int:
        token = self._byte_ids[byte]
        if token is None:
            token = self._unk_id
        if token is None:
            raise TokenizerError(f"{piece!r} is not in the vocabulary, which has neither a "
                                 f"<0x{byte:02X}> byte token nor an unknown token")
        return token
