"""Repacked weights kept on disk: a model's later loads map them instead of repacking.

Loading a GGUF file on the CPU repacks every quantized matrix into the kernels' layout
(repack.py): a copy as large as the file, most of whose time is the first touch of that
much new memory. After a load that repacked something, the copies are written (on a
thread, so the first reply does not wait) to one file per model under `<cache>/repacked/`,
named by the model file's identity (device, inode, size, modification time); a later load
of the same file maps it copy-on-write instead: its pages come from the page cache, are
shared between processes, and are dropped under memory pressure rather than swapped.

Each matrix is found by its name, type, shape and a fingerprint of a few of its source
rows (after any reordering at load), so a change in how the rows are ordered cannot pick
up stale bytes; a cache file that does not read back whole (truncated, another format, a
different source) is ignored and written again. Models under MIN_BYTES are not kept
(repacking them costs less than reading the cache). The folder is held under
$DIPTYCH_REPACK_CACHE_GB gigabytes (default 8; 0 keeps nothing and reads nothing), least
recently used files out first, and a file is never written where it would leave the disk
with less than RESERVE_BYTES free.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from diptych.errors import InvalidArgumentError
from diptych.paths import cache_dir, write_cached

from .repack import R

MAGIC = b"DIPRPK\x00\x01"       # the last byte: this file format's version
ALIGN = 4096                    # every array starts on a page
MIN_BYTES = 32 << 20            # model files smaller than this are repacked every load
RESERVE_BYTES = 1 << 30         # free disk left after a cache file is written
DEFAULT_GB = 8.0
STALE_PART_S = 3600             # an unfinished write this old was killed: removed
MADV_POPULATE_READ = 22         # Linux's value; Python's mmap module does not name it

Packed = tuple[np.ndarray, np.ndarray]

_store: ContextVar[_Store | None] = ContextVar("diptych_repack_store", default=None)


def folder() -> Path:
    return cache_dir() / "repacked"


def cap_bytes() -> int:
    """$DIPTYCH_REPACK_CACHE_GB in bytes (unset: DEFAULT_GB)."""
    raw = os.environ.get("DIPTYCH_REPACK_CACHE_GB", "").strip()
    if not raw:
        return int(DEFAULT_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (gb >= 0 and math.isfinite(gb)):
        raise InvalidArgumentError(f"DIPTYCH_REPACK_CACHE_GB={raw!r}: expected a number of "
                                   f"gigabytes >= 0 (0 keeps no repacked weights)")
    return int(gb * 1e9)


@contextmanager
def kept_for(model: Path):
    """Within it, `repacked` looks each weight up in `model`'s cache file and records the
    ones it repacks; when the block ends without an error and something was repacked, the
    cache file is written anew on a thread (`last_writer()` is that thread)."""
    store = _Store.open(Path(model))
    if store is None:
        yield
        return
    token = _store.set(store)
    try:
        yield
    finally:
        _store.reset(token)
    store.save()


def repacked(name: str, type_name: str, shape: tuple[int, int], blocks: list[np.ndarray],
             pack: Callable[[], Packed]) -> Packed:
    """The weight `name` in the row-interleaved layout: from the cache file of the model
    being loaded when it holds it, else `pack()` (recorded for the next write)."""
    store = _store.get()
    if store is None:
        return pack()
    key = weight_key(name, type_name, shape, blocks)
    found = store.found.get(key)
    if found is None:
        found = pack()
        store.repacked_bytes += found[0].nbytes + found[1].nbytes
    store.weights[key] = found
    return found


def weight_key(name: str, type_name: str, shape: tuple[int, int],
               blocks: list[np.ndarray]) -> str:
    """Name, type, shape and a hash of four rows of each part (the second, two inner ones,
    the next to last; the Q/K un-permutation at load moves the second row)."""
    h = hashlib.blake2b(digest_size=8)
    for b in blocks:
        n = len(b)
        for r in sorted({min(1, n - 1), n // 3, min(2 * n // 3 + 1, n - 1), max(n - 2, 0)}):
            h.update(np.ascontiguousarray(b[r]).tobytes())
    return f"{name}:{type_name}:{shape[0]}x{shape[1]}:{h.hexdigest()}"


_writer: threading.Thread | None = None


def last_writer() -> threading.Thread | None:
    """The thread writing the last cache file, if any (the tests join it)."""
    return _writer


class _Store:
    """One load's view of one model's cache file."""

    def __init__(self, path: Path, source: dict, found: dict[str, Packed], cap: int):
        self.path, self.source, self.found, self.cap = path, source, found, cap
        self.weights: dict[str, Packed] = {}   # every weight of this load, in load order
        self.repacked_bytes = 0                # of those, repacked (not found)

    @classmethod
    def open(cls, model: Path) -> _Store | None:
        cap = cap_bytes()
        try:
            st = os.stat(model)
        except OSError:
            return None
        if cap == 0 or st.st_size < MIN_BYTES:
            return None
        source = dict(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                      layout=f"rows{R}")
        digest = hashlib.blake2b(json.dumps(source, sort_keys=True).encode() + MAGIC,
                                 digest_size=16).hexdigest()
        path = folder() / f"{digest}.bin"
        return cls(path, source, _read(path, source), cap)

    def save(self) -> None:
        global _writer
        if not self.repacked_bytes:
            return
        offsets, size = _layout(self.source, self.weights)
        if size > self.cap:
            return
        _writer = threading.Thread(target=self._write, args=(offsets, size),
                                   name="diptych-repack-cache")
        _writer.start()

    def _write(self, offsets: dict, size: int) -> None:
        """Not daemonic: a process that ends just after loading waits for the file."""
        try:
            home = self.path.parent
            home.mkdir(parents=True, exist_ok=True)
            _evict(home, self.cap - size, keep=self.path)
            if shutil.disk_usage(home).free < size + RESERVE_BYTES:
                return
        except OSError:
            return
        write_cached(self.path,
                     lambda tmp: _write_file(tmp, self.source, self.weights, offsets, size))


def _layout(source: dict, weights: dict[str, Packed]) -> tuple[dict, int]:
    """Each weight's (offset of P, offset of Pt) and the file's size: the header (magic,
    index length, JSON index) first, with room for the offsets' digits."""
    offsets, at = {}, 0
    for key, (P, Pt) in weights.items():
        pt_at = _aligned(at + P.nbytes)
        offsets[key] = (at, pt_at)
        at = _aligned(pt_at + Pt.nbytes)
    head = _aligned(16 + len(_index(source, weights, offsets, at)) + 32 * len(weights) + 256)
    return {k: (p + head, pt + head) for k, (p, pt) in offsets.items()}, head + at


def _index(source: dict, weights: dict[str, Packed], offsets: dict, size: int) -> bytes:
    return json.dumps(dict(source=source, size=size, weights={
        k: [offsets[k][0], list(P.shape), offsets[k][1], list(Pt.shape)]
        for k, (P, Pt) in weights.items()})).encode()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _write_file(tmp: Path, source: dict, weights: dict[str, Packed], offsets: dict,
                size: int) -> None:
    index = _index(source, weights, offsets, size)
    if 16 + len(index) > min(p for p, _ in offsets.values()):
        raise OSError("the repack cache's index outgrew its room")  # _layout's margin
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(index).to_bytes(8, "little") + index)
        for key, (P, Pt) in weights.items():
            for arr, at in zip((P, Pt), offsets[key]):
                f.seek(at)
                f.write(np.ascontiguousarray(arr).data)
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())  # the rename publishes it: its bytes must be on disk first


def _read(path: Path, source: dict) -> dict[str, Packed]:
    """The weights in the cache file at `path`, mapped copy-on-write; {} when there is no
    whole file for `source` there."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) != 16 or head[:8] != MAGIC:
                return {}
            index = json.loads(f.read(int.from_bytes(head[8:], "little")))
            size = os.fstat(f.fileno()).st_size
            if index["source"] != source or index["size"] != size:
                return {}
            # writable (numba compiles read-only arrays as other types), private: no write
            # reaches the file
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        _populate(mm)
        data = np.frombuffer(mm, np.uint8)
        found = {}
        for key, (p_at, p_shape, pt_at, pt_shape) in index["weights"].items():
            found[key] = (_view(data, p_at, p_shape), _view(data, pt_at, pt_shape))
        os.utime(path)   # recently used (eviction goes by modification time)
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return found


def _populate(mm: mmap.mmap) -> None:
    """Map every page now, read-only, in one call (MADV_POPULATE_READ, Linux 5.14): the
    first forward reads them all anyway. (MAP_POPULATE on this writable mapping would copy
    every page.) Elsewhere the pages come in as they are first read."""
    try:
        mm.madvise(MADV_POPULATE_READ)
    except (OSError, AttributeError):
        pass


def _view(data: np.ndarray, at: int, shape: list) -> np.ndarray:
    """An entry's array; ValueError for an entry that is not one (past the end of the file,
    the slice is short and the reshape fails)."""
    if (len(shape) != 4 or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(at, int) or at < 0 or at % ALIGN):
        raise ValueError("bad entry")
    return data[at:at + math.prod(shape)].reshape(shape)


def _evict(home: Path, room: int, keep: Path) -> None:
    """Remove cache files, least recently used first, until the rest fit in `room` bytes
    (`keep`, about to be replaced, counts as gone), and unfinished writes left by killed
    processes."""
    files, now = [], time.time()
    for p in home.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.endswith(".part") and now - st.st_mtime > STALE_PART_S:
            p.unlink(missing_ok=True)
        elif p.suffix == ".bin" and p != keep:
            files.append((st.st_mtime, st.st_size, p))
    used = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if used <= room:
            break
        p.unlink(missing_ok=True)
        used -= size
