"""The CPU kernels compiled on first use and kept in numba's on-disk cache.

Each type's generated source (kernel_source.py) is written to a file named by the type and
a hash of that source and of llvm_bits.py (numba's cache=True needs a file, and keys its
cache on that file: a change to either makes a new file, so stale compiled code is never
loaded, and a change to one type recompiles only that type). numba caches the compiled
launchers (kernel_source.py) next to it, in diptych's cache folder (kernels/), and the
module's Python bytecode is kept there too (_module_code).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import marshal
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numba
from gguf import GGMLQuantizationType as QT

from diptych.paths import read_checked, write_checked
from diptych.quant.formats import FORMATS

from . import int8_activations, llvm_bits
from .cached_njit import cached_njit
from .kernel_source import I8_TYPES, KERNEL_TYPES, KERNELS, KINDS, kernel_source, \
    launcher_name, launcher_signature

# The omp layer launches a parallel region in ~2 us; numba's fallback "workqueue" layer costs
# 25-100 us per launch, which would dominate decode. Set before any kernel is launched;
# an explicit NUMBA_THREADING_LAYER is respected.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_LLVM_BITS_DIGEST = hashlib.sha256(inspect.getsource(llvm_bits).encode()).hexdigest()


def _kernel_dirs() -> list[Path]:
    dirs = []
    try:
        from diptych.paths import cache_dir

        dirs.append(cache_dir() / "kernels")
    except Exception:  # pragma: no cover
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs.append(Path(tempfile.gettempdir()) / f"diptych-kernels-{uid}")
    return dirs


def _load_kernel_module(t: QT):
    """Write one type's generated source into the cache folder (once) and import it."""
    src = kernel_source(t)
    digest = hashlib.sha256((src + _LLVM_BITS_DIGEST).encode()).hexdigest()[:12]
    name = f"diptych_qk_{t.name}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = None
    for d in _kernel_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            candidate = d / f"{name}.py"
            new = not candidate.exists()
            if new or candidate.read_text() != src:
                tmp = d / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(src)
                os.replace(tmp, candidate)
            if new:
                _remove_unused_versions(d, t, name)
            path = candidate
            break
        except OSError:
            continue
    if path is None:  # pragma: no cover
        raise OSError("diptych: no writable folder for the generated numba kernels")
    code = _module_code(path, src)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = mod  # numba's cache refers to the kernels' module by name
    try:
        exec(code, mod.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def _module_code(path: Path, src: str):
    """A kernel module's compiled code, kept beside its source. Python's own bytecode cache
    is off wherever PYTHONDONTWRITEBYTECODE is set (containers, CI images), and compiling a
    type's module is a visible part of a process's first token (BENCHMARKS.md)."""
    kept = path.parent / "__pycache__" / f"{path.stem}.{_CODE_TAG}.code"
    body = read_checked(kept)
    if body is not None:
        try:
            code = marshal.loads(body)
        except (EOFError, ValueError, TypeError):
            pass
        else:
            try:
                os.utime(kept)   # this version is in use (_remove_unused_versions)
            except OSError:
                pass
            return code
    code = compile(src, str(path), "exec")
    write_checked(kept, marshal.dumps(code))
    return code


#: A version of a type's kernels that no process has loaded for this long is removed when
#: a new version of that type is written (an upgrade changed its source): each version's
#: compiled kernels take megabytes, and nothing else would ever remove them. A version in
#: use is never old: loading it stamps its kept bytecode (_module_code).
UNUSED_FOR_S = 30 * 86400


def _remove_unused_versions(folder: Path, t: QT, current: str) -> None:
    """Remove the other versions of t's kernel module in `folder` (source, bytecode and
    numba's cache files) whose newest file is older than UNUSED_FOR_S."""
    version = re.compile(rf"diptych_qk_{t.name}_[0-9a-f]{{12}}\.py")
    cutoff = time.time() - UNUSED_FOR_S
    for source in folder.iterdir():
        if not version.fullmatch(source.name) or source.stem == current:
            continue
        files = [source, *(folder / "__pycache__").glob(f"{source.stem}.*")]
        try:
            if max(f.stat().st_mtime for f in files) < cutoff:
                for f in files:
                    f.unlink(missing_ok=True)
        except OSError:   # another process removed it first, or a read-only folder
            continue


# marshal's format is the interpreter's: the magic number changes with it
_CODE_TAG = f"{sys.implementation.cache_tag}-{importlib.util.MAGIC_NUMBER.hex()}"

_KERNELS: dict[tuple[str, QT], object] = {}
_LOCK = threading.Lock()
_compile_listener = None  # see set_compile_listener


def set_compile_listener(listener) -> None:
    """`listener(what)` is called before a kernel missing from the on-disk cache compiles
    (`what`: "compiling the ... kernel for this CPU"), `listener(None)` after it; None
    removes it. One per process, like the kernels (`Backend.on_first_use`)."""
    global _compile_listener
    _compile_listener = listener


_CALLED: set = set()  # the kernels call_announced called in this process


def call_announced(kernel, args: tuple, what: str):
    """kernel(*args) for a numba kernel compiled on its first call in a process (several
    seconds) or loaded from numba's on-disk cache. Compiling is announced to the compile
    listener ("compiling the {what} for this CPU") when the cache holds no version of the
    kernel yet; after the first call, a set lookup (numba's `signatures` costs 10-20 us)."""
    if kernel in _CALLED:
        return kernel(*args)
    listener = _compile_listener
    # the function's index in numba's cache (one for all its compiled signatures)
    if listener is None or Path(kernel._cache._cache_file._index_path).exists():
        out = kernel(*args)
    else:
        listener(f"compiling the {what} for this CPU")
        try:
            out = kernel(*args)
        finally:
            listener(None)
    _CALLED.add(kernel)
    return out


def kernel(kind: str, ggml_type):
    """The launcher of `kind` (one of KINDS) for a GGML type, compiled on first use (seconds:
    BENCHMARKS.md) or loaded from numba's on-disk cache. Its arguments are an int64 array of
    row groups (deq_rows: of positions in `ids`), then the kernel's others (KERNELS)."""
    key = (kind, QT(ggml_type))
    k = _KERNELS.get(key)
    if k is None:
        if not has_kernel(kind, key[1]):
            raise KeyError(f"no CPU kernel {kind!r} for GGML type {ggml_type} on this CPU")
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                mod = _load_kernel_module(key[1])
                py = getattr(mod, launcher_name(kind, key[1]))
                listener = _compile_listener
                if listener is not None and not is_cached(kind, key[1]):
                    listener(f"compiling the {key[1].name} {kind} kernel for this CPU")
                else:
                    listener = None
                try:
                    k = cached_njit(launcher_signature(kind), parallel=True)(py)
                finally:
                    if listener is not None:
                        listener(None)
                _KERNELS[key] = k
    return k


def has_kernel(kind: str, ggml_type) -> bool:
    """Whether `kind` exists for the type on this CPU (gemm_i8 needs AVX-512 VNNI)."""
    t = QT(ggml_type)
    if kind == "gemm_i8":
        return t in I8_TYPES and int8_activations.SUPPORTED
    return kind in KERNELS and t in KERNEL_TYPES


def _warm(kind: str, t: int) -> None:
    kernel(kind, t)   # returns nothing: a worker's compiled kernel is not sent back


# Kinds from the longest to compile to the shortest (the int8 kernels of the K-quants take
# the longest of all), the order in which precompile hands them out.
_COMPILE_ORDER = ("gemm_i8", "gemm_s", "gemv1", "deq_t", "deq_tb", "deq_rows")


def is_cached(kind: str, ggml_type) -> bool:
    """Whether numba's cache holds this kernel (without loading or compiling it)."""
    t = QT(ggml_type)
    mod = _load_kernel_module(t)
    cache = Path(mod.__file__).parent / "__pycache__"
    prefix = f"{mod.__name__}.{launcher_name(kind, t)}-"
    return cache.is_dir() and any(p.name.startswith(prefix) and p.suffix == ".nbi"
                                  for p in cache.iterdir())


def precompile(types=None, kinds=KINDS, processes: int | None = None) -> int:
    """Make sure the kernels for `types` (GGML types; default all) that this CPU has
    (has_kernel) are in numba's on-disk cache. numba compiles one function at a time, so
    missing kernels are compiled in up to `processes` subprocesses (default: the CPU count).
    Returns how many kernels were compiled."""
    types = [QT(t) for t in (types if types is not None else KERNEL_TYPES)]
    todo = sorted(((k, int(t)) for t in types for k in kinds
                   if has_kernel(k, t) and not is_cached(k, t)),
                  key=lambda task: (_COMPILE_ORDER.index(task[0]),   # K-quants first
                                    -FORMATS[QT(task[1])].block_size))
    if not todo:
        return 0
    n = max(1, min(processes or os.cpu_count() or 1, len(todo)))
    if n == 1:
        for task in todo:
            _warm(*task)
        return len(todo)
    import concurrent.futures
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    # One task per kernel, the longest first: each worker takes the next as it finishes (a
    # fixed split of the list had given one worker every int8 kernel, the other none).
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
            for f in [pool.submit(_warm, *task) for task in todo]:
                f.result()
    except BrokenProcessPool:
        # A spawned worker re-imports __main__: a script that calls precompile() outside an
        # `if __name__ == "__main__":` guard breaks its workers. Compile here instead.
        for task in todo:
            _warm(*task)
    return len(todo)
