"""Prepared weights kept on disk: a model file's later loads map them instead of preparing
them again (the CPU backend's repacked copies: `Backend.keep_prepared`).

Loading a GGUF file on the CPU repacks every quantized matrix into the kernels' layout
(backends/torch/cpu/repack.py): a copy as large as the file, most of whose time is the first
touch of that much new memory. After a load that repacked something, the copies are written
(on a thread, so the first reply does not wait) to one file per model file under
`<cache>/repacked/`, named by the model file's identity (device, inode, size, modification
time) and the backend's layout; a later load of the same file maps it copy-on-write
instead: its pages come from the page cache, are shared between processes, and are dropped
under memory pressure rather than swapped.

Each weight is found by its name, type, shape and a fingerprint of a few of its source rows
(after any reordering at load), so a change in how rows are ordered cannot pick up stale
bytes; a file that does not read back whole (truncated, another format, another source) is
ignored and written again. Model files under MIN_BYTES are not kept (preparing them costs
less than reading a cache file). The folder is held under $DIPTYCH_REPACK_CACHE_GB gigabytes
(default 8; 0 keeps nothing and reads nothing): files whose model file is gone or was
rewritten go first, then the least recently used; a file is never written where it would
leave the disk with less than RESERVE_BYTES free. `diptych list` shows the folder, `diptych
rm` removes a model's kept copies with it.

Torch-free on purpose: `diptych list` and `rm` read it without loading a backend.
"""

from __future__ import annotations

import atexit
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diptych.errors import InvalidArgumentError
from diptych.paths import cache_dir, write_cached

MAGIC = b"DIPRPK\x00\x01"       # the last byte: this file format's version
ALIGN = 4096                    # every array starts on a page
MIN_BYTES = 32 << 20            # model files smaller than this are prepared every load
RESERVE_BYTES = 1 << 30         # free disk left after a cache file is written
DEFAULT_GB = 8.0
STALE_PART_S = 3600             # an unfinished write this old was killed: removed
MADV_POPULATE_READ = 22         # Linux's value; Python's mmap module does not name it

Arrays = tuple[np.ndarray, ...]

_store: ContextVar[_Store | None] = ContextVar("diptych_prepared_store", default=None)
_writer: threading.Thread | None = None


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


# -- a load --------------------------------------------------------------------------------

@contextmanager
def kept_for(model: Path, layout: str):
    """Within it, `kept` looks each weight up in the cache file of `model` for a backend's
    `layout` (a tag naming how its prepared arrays are laid out) and records the ones it
    prepares; when the block ends without an error and something was prepared, the cache
    file is written anew on a thread (`last_writer()`)."""
    store = _Store.open(Path(model), layout)
    if store is None:
        yield
        return
    token = _store.set(store)
    try:
        yield
    finally:
        _store.reset(token)
    store.save()


def kept(name: str, type_name: str, shape: tuple[int, ...], blocks: list[np.ndarray],
         prepare: Callable[[], Arrays]) -> Arrays:
    """The prepared arrays of the weight `name` (made from `blocks`, its source rows): from
    the cache file of the model being loaded when it holds them, else `prepare()` (recorded
    for the next write)."""
    store = _store.get()
    if store is None:
        return prepare()
    key = weight_key(name, type_name, shape, blocks)
    found = store.found.get(key)
    if found is None:
        found = prepare()
    store.weights[key] = found
    return found


def weight_key(name: str, type_name: str, shape: tuple[int, ...],
               blocks: list[np.ndarray]) -> str:
    """Name, type, shape and a hash of four rows of each part (the second, two inner ones,
    the next to last; the Q/K un-permutation at load moves the second row)."""
    h = hashlib.blake2b(digest_size=8)
    for b in blocks:
        n = len(b)
        for r in sorted({min(1, n - 1), n // 3, min(2 * n // 3 + 1, n - 1), max(n - 2, 0)}):
            h.update(np.ascontiguousarray(b[r]).tobytes())
    return f"{name}:{type_name}:{'x'.join(map(str, shape))}:{h.hexdigest()}"


def last_writer() -> threading.Thread | None:
    """The thread writing the last cache file, if any (the tests join it)."""
    return _writer


@atexit.register
def _finish_writing() -> None:
    """A process that ends just after loading waits for the file; Ctrl+C while it waits
    abandons it (a later write removes the partial file)."""
    if _writer is not None:
        try:
            _writer.join()
        except KeyboardInterrupt:
            pass


def _source(model: Path, layout: str) -> dict | None:
    """What a cache file for `model` in `layout` records of its source; None when the file
    is gone or cannot be mapped privately here (Windows)."""
    identity = _identity(model)
    if identity is None or not hasattr(mmap, "MAP_PRIVATE"):
        return None
    return dict(identity, layout=layout, model=os.path.realpath(model))


def _cache_path(source: dict) -> Path:
    """Named by the source's identity and layout (not its path: a renamed file is the same)."""
    named = json.dumps({k: v for k, v in source.items() if k != "model"}, sort_keys=True)
    digest = hashlib.blake2b(named.encode() + MAGIC, digest_size=16).hexdigest()
    return folder() / f"{digest}.bin"


def describe(model: Path, layout: str) -> str:
    """Whether the next load of `model` in `layout` maps a kept copy (`diptych info`)."""
    cap = cap_bytes()
    source = _source(model, layout)
    if cap == 0:
        return "off (DIPTYCH_REPACK_CACHE_GB=0)"
    if source is None or source["size"] < MIN_BYTES:
        return f"not kept (models under {MIN_BYTES >> 20} MiB are repacked at each load)"
    path = _cache_path(source)
    try:
        with open(path, "rb") as f:
            index = _index_of_whole_file(f, source)
    except (OSError, ValueError, TypeError, KeyError):
        index = None
    if index is not None:
        return f"kept ({index['size'] / (1 << 20):.1f} MiB in {path}): loads map it"
    return "none yet: the next load keeps one (about the weights' size)"


def _identity(model: Path) -> dict | None:
    """What names a model file's contents without reading them; None when it is gone."""
    try:
        st = os.stat(model)
    except OSError:
        return None
    return dict(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


class _Store:
    """One load's view of one model file's cache file."""

    def __init__(self, path: Path, source: dict, found: dict[str, Arrays], cap: int):
        self.path, self.source, self.found, self.cap = path, source, found, cap
        self.weights: dict[str, Arrays] = {}   # every weight of this load, in load order

    @classmethod
    def open(cls, model: Path, layout: str) -> _Store | None:
        cap = cap_bytes()
        source = _source(model, layout)
        if cap == 0 or source is None or source["size"] < MIN_BYTES:
            return None
        path = _cache_path(source)
        return cls(path, source, _read(path, source), cap)

    def save(self) -> None:
        global _writer
        if self.weights.keys() <= self.found.keys():
            return   # everything came from the file
        offsets, size = _layout(self.source, self.weights)
        if size > self.cap:
            return
        _writer = threading.Thread(target=self._write, args=(offsets, size),
                                   name="diptych-prepared-cache", daemon=True)
        _writer.start()

    def _write(self, offsets: dict, size: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _evict(self.cap - size, keep=self.path)
            if shutil.disk_usage(self.path.parent).free < size + RESERVE_BYTES:
                return
        except OSError:
            return
        write_cached(self.path,
                     lambda tmp: _write_file(tmp, self.source, self.weights, offsets, size))


# -- the file: MAGIC, the index's length (8 bytes), the JSON index, the arrays ----------------

def _layout(source: dict, weights: dict[str, Arrays]) -> tuple[dict, int]:
    """Each weight's arrays' offsets and the file's size: the header first, with room for
    the offsets' digits."""
    offsets, at = {}, 0
    for key, arrays in weights.items():
        offsets[key] = []
        for a in arrays:
            offsets[key].append(at)
            at = _aligned(at + a.nbytes)
    head = _aligned(16 + len(_index(source, weights, offsets, at)) + 32 * len(weights) + 256)
    return {k: [o + head for o in v] for k, v in offsets.items()}, head + at


def _index(source: dict, weights: dict[str, Arrays], offsets: dict, size: int) -> bytes:
    return json.dumps(dict(source=source, size=size, weights={
        k: [[at, list(a.shape)] for at, a in zip(offsets[k], arrays)]
        for k, arrays in weights.items()})).encode()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _write_file(tmp: Path, source: dict, weights: dict[str, Arrays], offsets: dict,
                size: int) -> None:
    index = _index(source, weights, offsets, size)
    if 16 + len(index) > min(min(v) for v in offsets.values()):
        raise OSError("the cache file's index outgrew its room")  # _layout's margin
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(index).to_bytes(8, "little") + index)
        for key, arrays in weights.items():
            for a, at in zip(arrays, offsets[key]):
                f.seek(at)
                f.write(np.ascontiguousarray(a).data)
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())  # the rename publishes it: its bytes must be on disk first


def _read_index(f) -> dict | None:
    head = f.read(16)
    if len(head) != 16 or head[:8] != MAGIC:
        return None
    index = json.loads(f.read(int.from_bytes(head[8:], "little")))
    return index if isinstance(index, dict) else None


def _index_of_whole_file(f, source: dict) -> dict | None:
    """The index of the open cache file `f` when it is a whole one made from `source`."""
    index = _read_index(f)
    if index is None or index["source"] != source \
            or index["size"] != os.fstat(f.fileno()).st_size:
        return None
    return index


def _read(path: Path, source: dict) -> dict[str, Arrays]:
    """The weights in the cache file at `path`, mapped copy-on-write; {} when there is no
    whole file for `source` there."""
    try:
        with open(path, "rb") as f:
            index = _index_of_whole_file(f, source)
            if index is None:
                return {}
            # the whole file, writable (numba compiles read-only arrays as other types),
            # private: no write reaches the file
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        _populate(mm)
        data = np.frombuffer(mm, np.uint8)
        found = {key: tuple(_view(data, at, shape) for at, shape in entry)
                 for key, entry in index["weights"].items()}
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
    if (not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(at, int) or at < 0 or at % ALIGN):
        raise ValueError("bad entry")
    return data[at:at + math.prod(shape)].reshape(shape)


# -- the folder ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeptFile:
    path: Path
    size: int
    model: str | None   # the model file it was made from (None: unreadable)
    stale: bool         # that file is gone or was rewritten: it can never be read again


def kept_files() -> list[KeptFile]:
    """The cache files in the folder, least recently used first."""
    home = folder()
    out = []
    for p in sorted(home.glob("*.bin"), key=_mtime) if home.is_dir() else ():
        try:
            with open(p, "rb") as f:
                index = _read_index(f)
                size = os.fstat(f.fileno()).st_size
            source = index["source"]
            model = source["model"]
            stale = _source(Path(model), source["layout"]) != source
        except (OSError, ValueError, TypeError, KeyError):
            model, stale, size = None, True, _size(p)
        out.append(KeptFile(p, size, model, stale))
    return out


def forget(under: Path) -> list[Path]:
    """Remove the cache files made from the model file `under`, or from any file inside the
    folder `under` (a Hub repository); returns them."""
    under = Path(os.path.realpath(under))
    gone = []
    for kf in kept_files():
        if kf.model is not None and (Path(kf.model) == under or under in Path(kf.model).parents):
            kf.path.unlink(missing_ok=True)
            gone.append(kf.path)
    return gone


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _evict(room: int, keep: Path) -> None:
    """Remove unfinished writes left by killed processes, then cache files that can never
    be read again (their model file gone or rewritten, or unreadable), then the least
    recently used, until the rest fit in `room` bytes (`keep`, about to be replaced, counts
    as gone)."""
    now = time.time()
    for p in folder().glob(".*.part"):
        if now - _mtime(p) > STALE_PART_S:
            p.unlink(missing_ok=True)
    files = []
    for kf in kept_files():
        if kf.path == keep:
            continue
        if kf.stale:
            kf.path.unlink(missing_ok=True)
        else:
            files.append(kf)
    used = sum(kf.size for kf in files)
    for kf in files:   # least recently used first
        if used <= room:
            break
        kf.path.unlink(missing_ok=True)
        used -= kf.size
