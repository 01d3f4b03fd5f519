"""Repacked weights kept on disk (runtime/sources/prepared_cache.py, the CPU backend's
`keep_prepared`): a later load maps them; a damaged, stale or foreign cache file is never
used; the folder stays under its cap; `diptych list` shows it and `rm` empties it."""

from __future__ import annotations

import json
import mmap
import os
import shutil

import numpy as np
import pytest

import diptych
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.cpu.qlinear import QuantLinear
from diptych.errors import InvalidArgumentError
from diptych.sources import model_cache, prepared_cache

PROMPT = [1, 504, 3458, 282, 4637, 314, 216, 30, 2896]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    home = tmp_path / "repacked"
    monkeypatch.setattr(prepared_cache, "folder", lambda: home)
    monkeypatch.delenv("DIPTYCH_REPACK_CACHE_GB", raising=False)
    return home


def _finish_write():
    writer = prepared_cache.last_writer()
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
    index = json.loads(header[16:16 + int.from_bytes(header[8:16], "little")])
    first_key, entry = next(iter(index["weights"].items()))
    assert entry[0][0] % prepared_cache.ALIGN == 0
    past_the_end = dict(index, weights={**index["weights"], first_key: [[size, entry[0][1]],
                                                                         *entry[1:]]})
    for damage in (lambda: os.truncate(cached, size // 2),
                   lambda: cached.write_bytes(b"not a cache file"),
                   lambda: _rewrite_index(cached, past_the_end),
                   lambda: _rewrite_index(cached, dict(index, size=index["size"] + 1))):
        damage()
        model = _load(smollm2_path)
        assert not any(map(_mapped, _packed(model)))
        np.testing.assert_array_equal(model.logits(PROMPT), reference)
        assert cached.stat().st_size == size      # written whole again
    assert all(map(_mapped, _packed(_load(smollm2_path))))


def _rewrite_index(path, index):
    raw = bytearray(path.read_bytes())
    old_len = int.from_bytes(raw[8:16], "little")
    data_at = min(e[0][0] for e in json.loads(raw[16:16 + old_len])["weights"].values())
    new = json.dumps(index).encode()
    assert 16 + len(new) <= data_at   # inside the header's room
    raw[8:16] = len(new).to_bytes(8, "little")
    raw[16:16 + len(new)] = new
    path.write_bytes(bytes(raw))


def test_a_rewritten_model_file_gets_a_new_cache_file_and_the_old_one_goes(
        folder, smollm2_path, tmp_path):
    model_file = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, model_file)
    _load(model_file)
    (old,) = folder.glob("*.bin")
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert [k.stale for k in prepared_cache.kept_files()] == [True]
    model = _load(model_file)
    assert not any(map(_mapped, _packed(model)))   # the old file is not this one's
    (new,) = folder.glob("*.bin")                  # and, never readable again, it went
    assert new != old


def test_list_shows_the_kept_copies_and_rm_removes_them(folder, smollm2_path, tmp_path,
                                                        monkeypatch, capsys):
    from diptych.cli.main import main

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(model_cache, "models_dir", lambda: models)
    copy = models / "copy.gguf"
    shutil.copyfile(smollm2_path, copy)
    _load(copy)
    _load(smollm2_path)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    mib = sum(p.stat().st_size for p in folder.glob("*.bin")) / (1 << 20)
    assert "copy.gguf" in out and f"2 file(s), {mib:.1f} MiB in {folder}" in out

    removed = model_cache.remove("copy.gguf")
    assert removed[0] == copy and len(removed) == 2 and not removed[1].exists()
    (left,) = prepared_cache.kept_files()
    assert left.model == os.path.realpath(smollm2_path) and not left.stale


def test_info_says_whether_a_load_will_map_a_kept_copy(folder, smollm2_path, monkeypatch,
                                                      capsys):
    from diptych.cli.main import main

    layout = CpuBackend.prepared_layout
    assert prepared_cache.describe(smollm2_path, layout).startswith("none yet")
    _load(smollm2_path)
    assert main(["info", str(smollm2_path), "--backend", "torch"]) == 0
    (kept,) = folder.glob("*.bin")
    assert f"repacked copy   kept ({kept.stat().st_size / (1 << 20):.1f} MiB in {kept})" \
        in capsys.readouterr().out
    assert prepared_cache.describe(smollm2_path, "another layout").startswith("none yet")
    os.truncate(kept, 4096)
    assert prepared_cache.describe(smollm2_path, layout).startswith("none yet")
    monkeypatch.setattr(prepared_cache, "MIN_BYTES", 1 << 40)
    assert prepared_cache.describe(smollm2_path, layout).startswith("not kept")
    monkeypatch.setenv("DIPTYCH_REPACK_CACHE_GB", "0")
    assert prepared_cache.describe(smollm2_path, layout).startswith("off")


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
def small_models(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_cache, "MIN_BYTES", 0)

    def make(name):
        path = tmp_path / name
        path.write_bytes(b"GGUF" + bytes(60))
        return path
    return make


def _counting(calls, arrays):
    def prepare():
        calls.append(1)
        return arrays
    return prepare


def test_a_weight_is_found_by_name_type_shape_and_its_rows(small_models, folder):
    model = small_models("small.gguf")
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (96, 18), dtype=np.uint8)]
    arrays = (rng.integers(0, 256, (1, 1, 18, 64), dtype=np.uint8),
              rng.integers(0, 256, (1, 1, 18, 32), dtype=np.uint8))
    calls = []
    with prepared_cache.kept_for(model, "test"):
        prepared_cache.kept("w", "Q4_0", (96, 32), blocks, _counting(calls, arrays))
    _finish_write()
    reordered = [blocks[0][np.r_[0, 2, 1, 3:96]]]   # rows 1 and 2 swapped
    with prepared_cache.kept_for(model, "test"):
        same = prepared_cache.kept("w", "Q4_0", (96, 32), blocks, _counting(calls, None))
        for args in (("v", "Q4_0", (96, 32), blocks), ("w", "Q4_1", (96, 32), blocks),
                     ("w", "Q4_0", (96, 64), blocks), ("w", "Q4_0", (96, 32), reordered)):
            other = prepared_cache.kept(*args, _counting(calls, arrays))
            assert not _mapped(other[0])
    _finish_write()
    with prepared_cache.kept_for(model, "another layout"):
        prepared_cache.kept("w", "Q4_0", (96, 32), blocks, _counting(calls, arrays))
    _finish_write()
    assert len(calls) == 6
    assert len(list(folder.glob("*.bin"))) == 2   # one file per layout
    assert all(map(_mapped, same))
    for got, want in zip(same, arrays):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable   # numba compiles read-only arrays as other types
        assert got.ctypes.data % 64 == 0


def test_a_failed_load_writes_nothing(small_models, folder):
    model = small_models("small.gguf")
    arrays = (np.zeros((1, 1, 18, 64), np.uint8), np.zeros((1, 1, 18, 0), np.uint8))
    with pytest.raises(KeyboardInterrupt):
        with prepared_cache.kept_for(model, "test"):
            prepared_cache.kept("w", "Q4_0", (64, 32), [arrays[0][0, 0]], lambda: arrays)
            raise KeyboardInterrupt
    _finish_write()
    assert not folder.exists() or not any(folder.iterdir())


def _keep(model, fill: int):
    with prepared_cache.kept_for(model, "test"):
        prepared_cache.kept("w", "Q8_0", (2, 34), [np.zeros((2, 34), np.uint8)],
                            lambda: (np.full(5000, fill, np.uint8),))
    _finish_write()
    (kept,) = [k.path for k in prepared_cache.kept_files()
               if k.model == os.path.realpath(model)]
    return kept


def test_eviction_goes_by_last_use_after_what_can_never_be_read(small_models, folder):
    models = [small_models(f"{n}.gguf") for n in "abcd"]
    a, b, c, d = (_keep(m, i) for i, m in enumerate(models))
    for age, kept in enumerate((c, a, b, d)):         # c least recently used
        os.utime(kept, (1000 + age, 1000 + age))
    stale, fresh = folder / ".x.bin.1.part", folder / ".y.bin.2.part"
    stale.write_bytes(b"x")
    os.utime(stale, (1000, 1000))
    fresh.write_bytes(b"y")
    models[1].unlink()                                # b can never be read again
    size = d.stat().st_size
    prepared_cache._evict(room=size + 100, keep=d)
    assert sorted(p.name for p in folder.iterdir()) == sorted([fresh.name, a.name, d.name])
