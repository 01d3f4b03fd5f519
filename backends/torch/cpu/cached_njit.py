"""numba's njit with its on-disk cache, loaded without refreshing numba's compiler registries.

Before numba loads a cached function it refreshes its target context: it imports and
installs every typing and lowering registry it has (numpy, linalg, random, typed containers
and more), which only compiling uses; on the first cached function a process loads, that
refresh is most of the load (BENCHMARKS.md: "Load to first token: cached kernels loaded
without numba's compiler registries"). A cached function needs only numba's runtime (NRT),
which the refresh would also have started. A cache miss still refreshes the registries, in
numba's compiler (CompilerBase).

Every numba function of the CPU backend takes this decorator, but for the generated kernels
that their launchers call (kernel_source._LAUNCHER): a cached launcher holds their code, so
they are only ever loaded while a launcher compiles.
"""

from __future__ import annotations

from numba import njit as _numba_njit
from numba.core.caching import FunctionCache
from numba.core.runtime import rtsys


class _CacheWithoutRegistries(FunctionCache):
    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
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
