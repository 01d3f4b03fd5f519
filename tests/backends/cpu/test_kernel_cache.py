"""kernel_cache: kernels compile once per machine and load from numba's on-disk cache in
every later process, whole (the launcher included: nothing is rebuilt per process) and
without numba's compiler registries, compiling its runtime's functions (cached_njit) or
compiling the kernel module's Python source, and
then compute what gguf-py does; the
compile listener hears of a compile and of nothing else; precompile survives a script that
spawns its workers without a __main__ guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from diptych.backends.torch.cpu import kernel_cache

PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from gguf import GGMLQuantizationType as QT, quants
    from numba.core.runtime import nrtdynmod
    import builtins
    from diptych.backends.torch.cpu import kernel_cache
    module_compiles = []   # the kernel module's Python source compiled to bytecode
    kernel_cache.compile = lambda *a: (module_compiles.append(1), builtins.compile(*a))[1]
    runtime_compiles = []
    create_nrt_module = nrtdynmod.create_nrt_module
    nrtdynmod.create_nrt_module = lambda ctx: (runtime_compiles.append(1),
                                               create_nrt_module(ctx))[1]
    from diptych.backends.torch.cpu.qlinear import QuantLinear
    from diptych.quant import QuantTensor
    heard = []
    kernel_cache.set_compile_listener(heard.append)
    k = kernel_cache.kernel("deq_rows", QT.Q8_0)
    blocks = quants.quantize(np.random.default_rng(0).standard_normal((64, 96), np.float32),
                             QT.Q8_0)
    ids = [3, 0, 63, 3]
    rows = QuantLinear.from_quant_tensor(QuantTensor("w", QT.Q8_0, (64, 96), blocks)
                                         ).embed_rows(torch.tensor(ids))
    print(json.dumps({"heard": heard, "hits": len(k.stats.cache_hits),
                      "misses": len(k.stats.cache_misses),
                      "cached": kernel_cache.is_cached("deq_rows", QT.Q8_0),
                      "exact": bool(np.array_equal(rows.numpy(),
                                                   quants.dequantize(blocks, QT.Q8_0)[ids])),
                      "registries": "numba.np.linalg" in sys.modules,
                      "runtime_compiles": len(runtime_compiles),
                      "module_compiles": len(module_compiles)}))
""")


def _probe(cache_dir) -> dict:
    # Python's own bytecode cache off, as in many containers: the kernel module's is diptych's
    env = {**os.environ, "DIPTYCH_CACHE": str(cache_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not kernel_cache.has_kernel("deq_rows", 8), reason="no CPU kernels")
def test_a_kernel_compiles_once_then_loads_whole_from_the_cache(tmp_path):
    first = _probe(tmp_path)
    assert first["heard"] == ["compiling the Q8_0 deq_rows kernel for this CPU", None]
    assert first["misses"] == 1 and first["cached"] and first["exact"]
    assert first["registries"]  # what the second process is spared: compiling loads them
    assert first["runtime_compiles"] == 1 and first["module_compiles"] == 1
    again = _probe(tmp_path)
    assert again["heard"] == []
    assert again["hits"] == 1 and again["misses"] == 0 and again["exact"]
    assert not again["registries"] and again["runtime_compiles"] == 0
    assert again["module_compiles"] == 0


ANNOUNCED = textwrap.dedent("""
    import json
    import numpy as np
    from diptych.backends.torch.cpu import kernel_cache
    from diptych.backends.torch.cpu.cached_njit import cached_njit

    @cached_njit()
    def twice(x):
        return 2 * x

    heard = []
    kernel_cache.set_compile_listener(heard.append)
    out = [kernel_cache.call_announced(twice, (np.arange(3.0),), "doubling kernel").tolist()
           for _ in range(2)]
    print(json.dumps({"heard": heard, "out": out}))
""")


def test_a_kernel_compiled_on_its_first_call_is_announced_once_per_machine(tmp_path):
    """call_announced (the decode attention and the sampler's top-k): the listener hears
    of the compile in the first process, of nothing on the second call or in a later
    process that loads the kernel from numba's cache."""
    (tmp_path / "announced_probe.py").write_text(ANNOUNCED)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(tmp_path / "announced_probe.py")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"heard": ["compiling the doubling kernel for this CPU", None],
                       "out": [[0.0, 2.0, 4.0]] * 2}
    assert runs[1] == {"heard": [], "out": [[0.0, 2.0, 4.0]] * 2}


@pytest.mark.skipif(not kernel_cache.has_kernel("deq_rows", 8), reason="no CPU kernels")
@pytest.mark.parametrize("kept_file", ["nrt-*.bin", "__pycache__/diptych_qk_Q8_0_*.code"])
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_kept_file_is_compiled_again(tmp_path, kept_file, damage):
    """The runtime's kept object code and a kernel module's kept bytecode are checked
    before they are loaded: a damaged file is compiled again and rewritten, and the kernel
    still computes what gguf-py does."""
    _probe(tmp_path)
    (kept,) = (tmp_path / "kernels").glob(kept_file)
    data = kept.read_bytes()
    kept.write_bytes({"truncated": data[:len(data) // 2],
                      "flipped": data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:]}[damage])
    again = _probe(tmp_path)
    compiles = "runtime_compiles" if kept_file.startswith("nrt") else "module_compiles"
    assert again["exact"] and again["hits"] == 1 and again[compiles] == 1
    assert kept.read_bytes() == data
    assert _probe(tmp_path)[compiles] == 0


def _version(kernels, tname: str, digest: str, mtime: float) -> list:
    """The files of one version of a type's kernel module (source, bytecode, numba's
    cache), all last written at `mtime`."""
    stem = f"diptych_qk_{tname}_{digest}"
    files = [kernels / f"{stem}.py",
             kernels / "__pycache__" / f"{stem}.deq_rows_{tname}-9.py311.nbi",
             kernels / "__pycache__" / f"{stem}.deq_rows_{tname}-9.py311.1.nbc"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
        os.utime(f, (mtime, mtime))
    return files


@pytest.mark.skipif(not kernel_cache.has_kernel("deq_rows", 8), reason="no CPU kernels")
def test_a_new_version_of_a_type_removes_its_versions_unused_for_a_month(tmp_path):
    """An upgrade that changes a type's kernels writes a new version of its module; the
    versions of that type no process has loaded for UNUSED_FOR_S go, the others stay."""
    kernels = tmp_path / "kernels"
    old = time.time() - kernel_cache.UNUSED_FOR_S - 86400
    unused = _version(kernels, "Q8_0", "0" * 12, old)
    recent = _version(kernels, "Q8_0", "1" * 12, time.time() - 86400)
    other_type = _version(kernels, "Q4_0", "2" * 12, old)
    assert _probe(tmp_path)["exact"]
    assert not any(f.exists() for f in unused)
    assert all(f.exists() for f in recent + other_type)


@pytest.mark.skipif(not kernel_cache.has_kernel("deq_rows", 8), reason="no CPU kernels")
def test_loading_a_version_marks_it_in_use(tmp_path):
    """A version compiled long ago but loaded since is not unused: each load stamps its
    kept bytecode, the file _remove_unused_versions reads the age of last."""
    _probe(tmp_path)
    (code,) = (tmp_path / "kernels" / "__pycache__").glob("diptych_qk_Q8_0_*.code")
    old = time.time() - kernel_cache.UNUSED_FOR_S - 86400
    for f in code.parent.parent.rglob("diptych_qk_Q8_0_*"):
        os.utime(f, (old, old))
    _probe(tmp_path)
    assert code.stat().st_mtime > time.time() - 3600


UNGUARDED = textwrap.dedent("""
    from gguf import GGMLQuantizationType as QT
    from diptych.backends.torch.cpu import kernel_cache
    print("compiled", kernel_cache.precompile([QT.Q8_0], kinds=("deq_rows", "deq_t"),
                                              processes=2))
""")


def test_precompile_from_an_unguarded_script_compiles_in_process(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    env = {**os.environ, "DIPTYCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "compiled 2"


def test_precompile_hands_out_the_longest_compiles_first(monkeypatch):
    """Every kind has its place in the compile order; the K-quants' int8 kernels come first
    and the row lookups last, so that workers taking kernels as they finish end together."""
    from gguf import GGMLQuantizationType as QT

    assert sorted(kernel_cache._COMPILE_ORDER) == sorted(kernel_cache.KINDS)
    done = []
    monkeypatch.setattr(kernel_cache, "is_cached", lambda kind, t: False)
    monkeypatch.setattr(kernel_cache, "has_kernel", lambda kind, t: True)
    monkeypatch.setattr(kernel_cache, "_warm", lambda kind, t: done.append((kind, QT(t))))
    types = [QT.Q8_0, QT.Q6_K, QT.Q4_0]
    assert kernel_cache.precompile(types, processes=1) == len(types) * len(kernel_cache.KINDS)
    assert done[0] == ("gemm_i8", QT.Q6_K) and done[1][0] == "gemm_i8"
    assert [kind for kind, _ in done[-3:]] == ["deq_rows"] * 3
