"""numba's njit with its on-disk cache, loaded without refreshing numba's compiler registries.

Before numba loads a cached function it refreshes its target context: it imports and
installs every typing and lowering registry it has (numpy, linalg, random, typed containers
and more), which only compiling uses; on the first cached function a process loads, that
refresh is most of the load (BENCHMARKS.md: "Load to first token: cached kernels loaded
without numba's compiler registries"). A cached function needs only numba's runtime (NRT),
which the refresh would also have started. A cache miss still refreshes the registries, in
numba's compiler (CompilerBase).

Starting the runtime compiles a few of its functions with LLVM, which pages in most of
LLVM's optimizer and code generator: 27 MiB of libllvmlite's code resident (BENCHMARKS.md).
Their object code is kept in diptych's cache folder (one file per numba, llvmlite and CPU)
and later processes load it, as numba loads a cached function.

Every numba function of the CPU backend takes this decorator, but for the generated kernels
that their launchers call (kernel_source._LAUNCHER): a cached launcher holds their code, so
they are only ever loaded while a launcher compiles.
"""

from __future__ import annotations

import hashlib
import struct

import llvmlite
import numba
from numba import njit as _numba_njit
from numba.core.caching import FunctionCache
from numba.core.compiler_lock import global_compiler_lock
from numba.core.runtime import nrtdynmod, rtsys

from diptych.paths import cache_dir, read_checked, write_checked

_NRT_HEADER = struct.Struct("<Q")   # the length of the object code, before it


def _nrt_file(codegen):
    key = repr((numba.__version__, llvmlite.__version__, codegen.magic_tuple()))
    return cache_dir() / "kernels" / f"nrt-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"


def _read_nrt(path):
    """(object code, bitcode) of the runtime's functions, or None (read_checked)."""
    body = read_checked(path)
    if body is None or len(body) < _NRT_HEADER.size:
        return None
    (n_object,) = _NRT_HEADER.unpack_from(body)
    body = body[_NRT_HEADER.size:]
    return (body[:n_object], body[n_object:]) if n_object <= len(body) else None


def _nrt_functions(ctx):
    """numba's nrtdynmod.compile_nrt_functions, loaded from the object code an earlier
    process kept, or compiled and kept."""
    codegen = ctx.codegen()
    path = _nrt_file(codegen)
    kept = _read_nrt(path)
    if kept is not None:
        return codegen.unserialize_library(("nrt", "object", kept))
    ir_module, library = nrtdynmod.create_nrt_module(ctx)
    library.enable_object_caching()
    library.add_ir_module(ir_module)
    library.finalize()
    object_code, bitcode = library.serialize_using_object_code()[2]
    write_checked(path, _NRT_HEADER.pack(len(object_code)) + object_code + bitcode)
    return library


def start_runtime(ctx) -> None:
    """rtsys.initialize(ctx), its compiled functions from the kept object code."""
    with global_compiler_lock:
        compile_nrt_functions = nrtdynmod.compile_nrt_functions
        nrtdynmod.compile_nrt_functions = _nrt_functions
        try:
            rtsys.initialize(ctx)
        finally:
            nrtdynmod.compile_nrt_functions = compile_nrt_functions


class _CacheWithoutRegistries(FunctionCache):
    def load_overload(self, sig, target_context):
        start_runtime(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)


def cached_njit(signature: str | None = None, **options):
    """`numba.njit(signature, cache=True, **options)` whose cached code loads as above. With
    a signature, compiled (or loaded) now and for that signature only, as numba's eager
    njit is; without, on first call for each argument types."""

    def wrap(py_func):
        dispatcher = _numba_njit(cache=True, **options)(py_func)
        dispatcher._cache = _CacheWithoutRegistries(py_func)
        if signature is not None:
            dispatcher.compile(signature)
            dispatcher.disable_compile()
        return dispatcher

    return wrap
