"""The k best logits of a wide row on the CPU, in two passes instead of torch.topk's one.

torch.topk over a 150k-260k vocabulary runs a selection over the whole row, which was most
of a sampling step. Instead: cut the row into chunks of `CHUNK` values, take each chunk's
maximum (a fast vectorised reduction), keep the k chunks with the largest maxima, and
select the k best among their values. Any value outside those chunks has k chunk maxima
at least as large, so it is not among the k best (ties aside, whose order torch.topk does
not define either). A row whose length is not a multiple of CHUNK keeps its tail as
candidates.
"""

from __future__ import annotations

import torch

CHUNK = 128
# one torch.topk is as fast below this many values, or below this many chunks per value kept
MIN_WIDTH = 16384
MIN_CHUNKS_PER_PICK = 4
_OFFSETS = torch.arange(CHUNK)


def takes(width: int, k: int) -> bool:
    """Whether `topk` of k among `width` values goes through the chunks."""
    return width >= MIN_WIDTH and k * CHUNK * MIN_CHUNKS_PER_PICK <= width


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest values of each row of a 2-d x, largest first."""
    rows, width = x.shape
    n = width // CHUNK
    chunks = x[:, :n * CHUNK].view(rows, n, CHUNK)
    best = chunks.amax(-1).topk(k, -1).indices                          # (rows, k)
    cand = torch.gather(chunks, 1, best.unsqueeze(-1).expand(rows, k, CHUNK))
    ids = best.unsqueeze(-1) * CHUNK + _OFFSETS
    cand, ids = cand.reshape(rows, k * CHUNK), ids.reshape(rows, k * CHUNK)
    if n * CHUNK < width:
        cand = torch.cat([cand, x[:, n * CHUNK:]], 1)
        ids = torch.cat([ids, torch.arange(n * CHUNK, width).expand(rows, -1)], 1)
    values, at = cand.topk(k, -1)
    return values, torch.gather(ids, 1, at)
