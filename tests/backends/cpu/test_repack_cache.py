"""Repacked weights kept on disk (backends/torch/cpu/repack_cache.py): a later load maps
them; a damaged, stale or foreign cache file is never used; the folder stays under its cap."""

from __future__ import annotations

import json
import mmap
import os
import shutil

import numpy as np
import pytest

import diptych
from diptych.backends.torch.cpu import repack_cache
from diptych.backends.torch.cpu.qlinear import QuantLinear
from diptych.errors import InvalidArgumentError

PROMPT = [1, 504, 3458, 282, 4637, 314, 216, 30, 2896]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    home = tmp_path / "repacked"
    monkeypatch.setattr(repack_cache, "folder", lambda: home)
    monkeypatch.delenv("DIPTYCH_REPACK_CACHE_GB", raising=False)
    return home


def _finish_write():
    writer = repack_cache.last_writer()
    if writer is not None:
        writer.join()


def _mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a memory map (else memory of its own)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)


def _packed(model) -> list[np.ndarray]:
    return [w._P for _, w in model.engine.weights.linears()
            if isinstance(w, QuantLinear) and w.quantized]


def _load(path):
    model = diptych.load(path, backend="torch", n_ctx=256)
    _finish_write()
    return model


# -- a real model: the cached weights are the repacked ones, bit for bit ---------------------

def test_a_later_load_maps_the_weights_and_computes_the_same_logits(folder, smollm2_path):
    first = _load(smollm2_path)
    files = list(folder.glob("*.bin"))
    assert len(files) == 1
    packed = _packed(first)
    assert packed and not any(map(_mapped, packed))
    assert files[0].stat().st_size >= sum(p.nbytes for p in packed)

    second = _load(smollm2_path)
    assert all(map(_mapped, _packed(second)))
    np.testing.assert_array_equal(second.logits(PROMPT), first.logits(PROMPT))


def test_a_damaged_cache_file_is_repacked_and_written_again(folder, smollm2_path):
    reference = _load(smollm2_path).logits(PROMPT)
    (cached,) = folder.glob("*.bin")
    size = cached.stat().st_size
    header = cached.read_bytes()[:1 << 20]
    index_len = int.from_bytes(header[8:16], "little")
    index = json.loads(header[16:16 + index_len])
    entry = next(iter(index["weights"].values()))
    first_key = next(iter(index["weights"]))
    far = dict(index, weights={**index["weights"], first_key: [size, *entry[1:]]})
    for damage in (lambda: os.truncate(cached, size // 2),
                   lambda: cached.write_bytes(b"not a cache file"),
                   lambda: _rewrite_index(cached, far),
                   lambda: _rewrite_index(cached, dict(index, size=index["size"] + 1))):
        damage()
        model = _load(smollm2_path)
        assert not any(map(_mapped, _packed(model)))
        np.testing.assert_array_equal(model.logits(PROMPT), reference)
        assert cached.stat().st_size == size      # written whole again
    assert entry[0] % repack_cache.ALIGN == 0
    assert all(map(_mapped, _packed(_load(smollm2_path))))


def _rewrite_index(path, index):
    raw = bytearray(path.read_bytes())
    old_len = int.from_bytes(raw[8:16], "little")
    new = json.dumps(index).encode()
    data_at = min(v[0] for v in json.loads(raw[16:16 + old_len])["weights"].values())
    assert 16 + len(new) <= data_at   # inside the header's room
    raw[8:16] = len(new).to_bytes(8, "little")
    raw[16:16 + len(new)] = new
    path.write_bytes(bytes(raw))


def test_a_rewritten_model_file_gets_a_new_cache_file_and_the_old_one_goes(
        folder, smollm2_path, tmp_path, monkeypatch):
    model_file = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, model_file)
    _load(model_file)
    (old,) = folder.glob("*.bin")
    # room for one model's repacked weights only
    monkeypatch.setenv("DIPTYCH_REPACK_CACHE_GB", str(old.stat().st_size * 1.5 / 1e9))
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model = _load(model_file)
    assert not any(map(_mapped, _packed(model)))   # the old file is not this one's
    (new,) = folder.glob("*.bin")
    assert new != old


def test_turned_off_it_neither_reads_nor_writes(folder, smollm2_path, monkeypatch):
    _load(smollm2_path)
    monkeypatch.setenv("DIPTYCH_REPACK_CACHE_GB", "0")
    assert not any(map(_mapped, _packed(_load(smollm2_path))))
    shutil.rmtree(folder)
    _load(smollm2_path)
    assert not folder.exists()


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_bad_cap_is_a_clear_error(folder, smollm2_path, monkeypatch, value):
    monkeypatch.setenv("DIPTYCH_REPACK_CACHE_GB", value)
    with pytest.raises(InvalidArgumentError, match="DIPTYCH_REPACK_CACHE_GB"):
        diptych.load(smollm2_path, backend="torch", n_ctx=256)


# -- the store alone, on small arrays ---------------------------------------------------------

@pytest.fixture
def small_model(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(repack_cache, "MIN_BYTES", 0)
    path = tmp_path / "small.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _pack_counting(calls, arrays):
    def pack():
        calls.append(1)
        return arrays
    return pack


def test_a_weight_is_found_by_name_type_shape_and_its_rows(small_model):
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (96, 18), dtype=np.uint8)]
    arrays = (rng.integers(0, 256, (1, 1, 18, 64), dtype=np.uint8),
              rng.integers(0, 256, (1, 1, 18, 32), dtype=np.uint8))
    calls = []
    with repack_cache.kept_for(small_model):
        repack_cache.repacked("w", "Q4_0", (96, 32), blocks, _pack_counting(calls, arrays))
    _finish_write()
    reordered = [blocks[0][np.r_[0, 2, 1, 3:96]]]   # rows 1 and 2 swapped
    with repack_cache.kept_for(small_model):
        same = repack_cache.repacked("w", "Q4_0", (96, 32), blocks, _pack_counting(calls, None))
        for args in (("v", "Q4_0", (96, 32), blocks), ("w", "Q4_1", (96, 32), blocks),
                     ("w", "Q4_0", (96, 64), blocks), ("w", "Q4_0", (96, 32), reordered)):
            other = repack_cache.repacked(*args, _pack_counting(calls, arrays))
            assert not _mapped(other[0])
    assert len(calls) == 5
    _finish_write()
    assert all(map(_mapped, same))
    for got, want in zip(same, arrays):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable   # numba compiles read-only arrays as other types
        assert got.ctypes.data % 64 == 0


def test_a_failed_load_writes_nothing(small_model, folder):
    arrays = (np.zeros((1, 1, 18, 64), np.uint8), np.zeros((1, 1, 18, 0), np.uint8))
    with pytest.raises(KeyboardInterrupt):
        with repack_cache.kept_for(small_model):
            repack_cache.repacked("w", "Q4_0", (64, 32), [arrays[0][0, 0]], lambda: arrays)
            raise KeyboardInterrupt
    _finish_write()
    assert not folder.exists() or not any(folder.iterdir())


def test_eviction_removes_the_least_recently_used_and_stale_partial_writes(folder):
    folder.mkdir()
    sizes = {"a.bin": 300, "b.bin": 300, "c.bin": 300}
    for age, (name, size) in enumerate(sizes.items()):
        p = folder / name
        p.write_bytes(bytes(size))
        os.utime(p, (1000 + age, 1000 + age))       # a oldest
    stale, fresh = folder / ".x.bin.1.part", folder / ".y.bin.2.part"
    stale.write_bytes(b"x")
    os.utime(stale, (1000, 1000))
    fresh.write_bytes(b"y")
    repack_cache._evict(folder, room=400, keep=folder / "c.bin")
    assert sorted(p.name for p in folder.iterdir()) == [".y.bin.2.part", "b.bin", "c.bin"]
