"""The importance matrix, as llama.cpp's `llama-imatrix` computes it: for each weight matrix,
the sum over every token of the text of each input column's squared activation, and the
number of tokens. `diptych quantize --imatrix` weighs each weight's rounding error by its
column's mean squared activation (sum / count), as llama-quantize does.

The text is tokenized whole and cut into chunks of `n_ctx` tokens, each evaluated from an
empty context with its first token replaced by BOS where the model adds one (llama-imatrix's
procedure). The backend calls the runtime's `linear_observer` with each linear's input;
a matrix stacked at load (Q, K and V; gate and up) shares its input, so its statistics go
to each tensor it holds. The output head is skipped (llama-imatrix's default). Routed
experts (`ffn_{gate,up,down}_exps`) get one row of sums per expert, counting the
(token, expert) pairs routed to it, as llama-imatrix records `mul_mat_id`: `expert_ffn`
calls the observer with the rows and the experts chosen for them.

Files: llama.cpp's GGUF layout (`general.type = "imatrix"`, `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size`; per matrix `<tensor>.in_sum2` F32 (n_mat,
n_in) and `<tensor>.counts` F32 (n_mat, 1)); the legacy `.dat` files of older llama.cpp
read too (their sums are per chunk: sum / count * n_chunks, with the chunk count).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from diptych.errors import InvalidArgumentError, ModelFileError
from diptych.model.graph import forward_all
from diptych.quant.gguf_write import write_atomically

# weight tree attribute -> GGUF tensor names of the matrices it holds (one input for all)
_TENSORS = {"wqkv": ("attn_q", "attn_k", "attn_v"), "wq": ("attn_q",), "wk": ("attn_k",),
            "wv": ("attn_v",), "wo": ("attn_output",), "wq_a": ("attn_q_a",),
            "wq_b": ("attn_q_b",), "wkv_a": ("attn_kv_a_mqa",),
            "w_gate_up": ("ffn_gate", "ffn_up"), "w_gate": ("ffn_gate",), "w_up": ("ffn_up",),
            "w_down": ("ffn_down",)}


@dataclass
class Imatrix:
    """tensor name -> (sums (n_mat, n_in) float64, counts (n_mat,) float64), with the file
    metadata llama.cpp records."""

    entries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray | None:
        """The mean squared input (n_mat, n_in) float32 of tensor `name` (llama-quantize's
        values: sum / count, 1 where nothing was counted); None without an entry."""
        if name not in self.entries:
            return None
        sums, counts = self.entries[name]
        safe = np.where(counts > 0, counts, 1)[:, None]
        return np.where(counts[:, None] > 0, sums / safe, 1.0).astype(np.float32)

    def save(self, path: str | Path, arch: str) -> Path:
        """Write llama.cpp's GGUF imatrix file (under a temporary name, then renamed)."""
        def write(tmp: Path) -> None:
            w = gguf.GGUFWriter(str(tmp), arch)
            w.add_string("general.type", "imatrix")
            w.add_array("imatrix.datasets", list(self.datasets))
            w.add_uint32("imatrix.chunk_count", self.chunk_count)
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name, (sums, counts) in sorted(self.entries.items()):
                w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
                w.add_tensor(f"{name}.counts", counts.astype(np.float32)[:, None])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return write_atomically(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        """A GGUF imatrix file, or a legacy `.dat` one."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> Imatrix:
        from diptych.quant.gguf_file import GGUFFile

        f = GGUFFile(path)
        md = f.metadata
        if md.get("general.type") != "imatrix":
            raise ModelFileError(f"{path}: a GGUF file that is not an imatrix "
                                 f"(general.type {md.get('general.type')!r})")
        out = cls(datasets=list(md.get("imatrix.datasets", [])),
                  chunk_count=int(md.get("imatrix.chunk_count", 0)),
                  chunk_size=int(md.get("imatrix.chunk_size", 0)))
        for key, t in f.tensors.items():
            if not key.endswith(".in_sum2"):
                continue
            name = key.removesuffix(".in_sum2")
            counts = f.tensors.get(f"{name}.counts")
            if counts is None or t.type_name != "F32" or counts.type_name != "F32":
                raise ModelFileError(f"{path}: {name} lacks F32 in_sum2 and counts tensors")
            sums = t.dequantize().astype(np.float64).reshape(-1, t.shape[-1])
            n = counts.dequantize().astype(np.float64).reshape(-1)
            if len(n) != sums.shape[0]:
                raise ModelFileError(f"{path}: {name} has {len(n)} counts for "
                                     f"{sums.shape[0]} matrices")
            out.entries[name] = (sums, n)
        if not out.entries:
            raise ModelFileError(f"{path}: an imatrix file without entries")
        return out

    @classmethod
    def _load_legacy(cls, path: Path) -> Imatrix:
        data = path.read_bytes()
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise ModelFileError(f"{path}: truncated, or neither a GGUF nor a legacy "
                                     "imatrix file")
            values = struct.unpack_from(fmt, data, pos)
            pos += size
            return values

        (n_entries,) = take("<i")
        if n_entries < 1:
            raise ModelFileError(f"{path}: not an imatrix file (no entries)")
        out = cls()
        for _ in range(n_entries):
            (length,) = take("<i")
            if not 0 < length <= 4096:
                raise ModelFileError(f"{path}: not an imatrix file (a name of {length} bytes)")
            name = take(f"<{length}s")[0].decode("utf-8", "replace")
            ncall, nval = take("<ii")
            if nval < 1:
                raise ModelFileError(f"{path}: entry {name} has {nval} values")
            sums = np.array(take(f"<{nval}f"), dtype=np.float64)[None, :]
            # sum / count * ncall: divided by ncall it is llama-quantize's mean
            out.entries[name] = (sums, np.array([float(ncall)]))
        if pos + 4 <= len(data):
            (out.chunk_count,) = take("<i")
            if pos + 4 <= len(data):
                (length,) = take("<i")
                if 0 < length <= len(data) - pos:
                    out.datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
        return out


def observed_tensors(cfg, weights) -> dict[int, tuple[tuple[str, ...], int]]:
    """id(prepared matrix) -> (the GGUF names of the matrices it holds, how many matrices
    each holds: 1, or the expert count of stacked routed experts), for every matrix of the
    layers (the output head is not observed)."""
    out = {}
    for i, layer in enumerate(weights.layers):
        shared = "_shexp" if layer.experts is not None else ""  # an MoE layer's dense FFN
        for attr, kinds in _TENSORS.items():
            w = getattr(layer, attr)
            if w is not None:
                suffix = shared if attr.startswith("w_") else ""
                out[id(w)] = (tuple(f"blk.{i}.{k}{suffix}.weight" for k in kinds), 1)
        if layer.experts is not None:
            for kind in ("gate", "up", "down"):
                stacked = getattr(layer.experts, kind)
                out[id(stacked)] = ((f"blk.{i}.ffn_{kind}_exps.weight",), cfg.moe.n_experts)
    return out


def collect_imatrix(model, text_ids: list[int], n_ctx: int = 512, dataset: str = "",
                    progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """The importance matrix of `model` over the token ids of a text, in chunks of `n_ctx`
    tokens; `progress(done, total)` counts chunks."""
    if n_ctx < 2:
        raise InvalidArgumentError(f"chunks must hold at least 2 tokens, not {n_ctx}")
    n_chunks = len(text_ids) // n_ctx
    if n_chunks < 1:
        raise InvalidArgumentError(f"the text has {len(text_ids)} tokens; the importance "
                                   f"matrix needs at least one chunk of {n_ctx}")
    engine, be = model.engine, model.backend
    names = observed_tensors(model.config, engine.weights)
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, np.ndarray] = {}

    def observe(x, w, chosen=None) -> None:
        if id(w) not in names:
            return
        n_mat = names[id(w)][1]
        a = be.to_numpy(x).astype(np.float64)
        if id(w) not in sums:
            sums[id(w)], counts[id(w)] = np.zeros((n_mat, a.shape[-1])), np.zeros(n_mat)
        if chosen is None:
            a = a.reshape(-1, a.shape[-1])
            sums[id(w)][0] += np.einsum("ij,ij->j", a, a)
            counts[id(w)][0] += a.shape[0]
            return
        ids = np.asarray(chosen if isinstance(chosen, np.ndarray) else be.to_numpy(chosen))
        ids = ids.astype(np.int64)
        if a.ndim == ids.ndim:   # one input row for all of a token's experts
            a = a[..., None, :]
        a = np.broadcast_to(a, ids.shape + a.shape[-1:]).reshape(-1, a.shape[-1])
        ids = ids.reshape(-1)
        for e in np.unique(ids):
            rows = a[ids == e]
            sums[id(w)][e] += np.einsum("ij,ij->j", rows, rows)
        counts[id(w)] += np.bincount(ids, minlength=n_mat)

    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    with engine.lock, be.inference():
        engine.release(engine.claim())   # supersedes an unfinished generation
        be.linear_observer = observe
        try:
            for c in range(n_chunks):
                chunk = list(text_ids[c * n_ctx:(c + 1) * n_ctx])
                if bos is not None:
                    chunk[0] = bos
                # the plain forward, not the engine's steps, which a backend may replay
                # from a capture (CUDA graphs) without calling the observer
                forward_all(be, model.config, engine.weights, be.ids(np.array([chunk])),
                            np.array([n_ctx - 1]))
                if progress:
                    progress(c + 1, n_chunks)
        finally:
            be.linear_observer = None
    out = Imatrix(datasets=[dataset] if dataset else [], chunk_count=n_chunks,
                  chunk_size=n_ctx)
    for key, (tensor_names, _) in names.items():
        if key in sums:
            for name in tensor_names:
                out.entries[name] = (sums[key], counts[key])
    return out
