"""GGUFFile: real files against gguf.GGUFReader, GGUFWriter round trips, corrupt inputs."""

from __future__ import annotations

import mmap
import struct

import gguf
import numpy as np
import psutil
import pytest
from gguf import GGML_QUANT_SIZES, GGUFValueType as V
from gguf import GGMLQuantizationType as T

from diptych.errors import ModelFileError, UnsupportedModelError
from diptych.quant.dequant import SUPPORTED_TYPES
from diptych.quant.gguf_file import GGUFFile, GGUFMetadata, _decode_strings
from diptych.text.tokenizer import Tokenizer


# -- real files against GGUFReader ------------------------------------------------------

def _reader_value(field: gguf.ReaderField):
    if field.types[0] == V.ARRAY and field.types[-1] != V.STRING:
        return np.array(field.contents())
    return field.contents()


def _compare_with_reader(path, n_bytes_checked=6):
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_fields)
    for key, field in ref_fields.items():
        assert ours.metadata.value_type(key) == field.types[0], key
        got, want = ours.metadata[key], _reader_value(field)
        if isinstance(want, np.ndarray):
            assert ours.metadata.element_type(key) == field.types[-1]
            assert isinstance(got, np.ndarray) and np.array_equal(got, want), key
        else:
            assert type(got) is type(want) and got == want, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = ours.tensors[rt.name]
        assert t.ggml_type == rt.tensor_type
        assert t.shape == tuple(reversed(rt.shape.tolist()))
        assert ours.tensor_offsets[rt.name] == rt.data_offset and t.nbytes == rt.n_bytes
    # Byte contents of a few tensors (first, last and the biggest ones).
    names = [t.name for t in sorted(ref.tensors, key=lambda t: -t.n_bytes)][:n_bytes_checked - 2]
    names += [ref.tensors[0].name, ref.tensors[-1].name]
    by_name = {t.name: t for t in ref.tensors}
    for name in names:
        assert np.array_equal(ours.tensors[name].data.reshape(-1),
                              by_name[name].data.view(np.uint8).reshape(-1)), name
    return ours


@pytest.mark.real
def test_smollm2_matches_gguf_reader(smollm2_path):
    f = _compare_with_reader(smollm2_path)
    assert f.architecture == "llama" and f.version == 3
    assert f.tensors["token_embd.weight"].shape == (49152, 576)
    assert f.tensors["blk.0.attn_q.weight"].ggml_type == T.Q4_1
    f.close()


@pytest.mark.real
def test_qwen_matches_gguf_reader(qwen_path):
    f = _compare_with_reader(qwen_path)
    assert f.architecture == "qwen2"
    assert f.tensors["blk.0.ffn_down.weight"].shape == (896, 4864)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 151936
    f.close()


@pytest.mark.real
def test_qwen_vocab_is_not_decoded_at_open(qwen_path):
    with GGUFFile(qwen_path) as f:
        md = f.metadata
        scalars = {k: md[k] for k in md if md.value_type(k) != V.ARRAY}
        assert scalars["tokenizer.ggml.model"] == "gpt2"
        assert "tokenizer.ggml.tokens" in md and "tokenizer.ggml.merges" in md
        assert md.array_length("tokenizer.ggml.tokens") == 151936
        assert md.element_type("tokenizer.ggml.tokens") == V.STRING
        assert not md.is_decoded("tokenizer.ggml.tokens")
        assert not md.is_decoded("tokenizer.ggml.merges")
        tokens = md["tokenizer.ggml.tokens"]
        assert md.is_decoded("tokenizer.ggml.tokens") and tokens[:3] == ["!", '"', "#"]
        assert not md.is_decoded("tokenizer.ggml.merges")
        # the tokenizer copies the merges into its own model: the metadata keeps none
        Tokenizer.from_gguf_metadata(md)
        assert not md.is_decoded("tokenizer.ggml.merges")
        merges = md.take("tokenizer.ggml.merges")
        assert len(merges) == 151387 and merges[0] == "Ġ Ġ"
        assert md.take("tokenizer.ggml.merges") == merges == md["tokenizer.ggml.merges"]
        assert md.is_decoded("tokenizer.ggml.merges")


# -- synthetic files written by gguf.GGUFWriter -------------------------------------------

SCALARS = [
    ("t.u8", 200, V.UINT8), ("t.i8", -100, V.INT8), ("t.u16", 60000, V.UINT16),
    ("t.i16", -30000, V.INT16), ("t.u32", 4_000_000_000, V.UINT32),
    ("t.i32", -2_000_000_000, V.INT32),
    ("t.f32", 0.1, V.FLOAT32), ("t.bool", True, V.BOOL), ("t.str", "héllo ✓", V.STRING),
    ("t.u64", 2**63 + 5, V.UINT64), ("t.i64", -(2**62), V.INT64), ("t.f64", 0.1, V.FLOAT64),
]
ARRAYS = [
    ("a.u8", [1, 2, 255], V.UINT8, np.uint8), ("a.i8", [-1, 2], V.INT8, np.int8),
    ("a.u16", [7, 65535], V.UINT16, np.uint16), ("a.i16", [-7], V.INT16, np.int16),
    ("a.u32", [1, 2**32 - 1], V.UINT32, np.uint32), ("a.i32", [-5, 5], V.INT32, np.int32),
    ("a.f32", [0.5, -1.25], V.FLOAT32, np.float32),
    ("a.bool", [True, False, True], V.BOOL, np.bool_),
    ("a.u64", [2**64 - 1], V.UINT64, np.uint64), ("a.i64", [-(2**63)], V.INT64, np.int64),
    ("a.f64", [0.1, 1e300], V.FLOAT64, np.float64),
]


def write_synthetic(path, alignment=None, n_tokens=50):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val, vt in SCALARS:
        w.add_key_value(key, val, vt)
    for key, val, vt, _ in ARRAYS:
        w.add_key_value(key, val, V.ARRAY, sub_type=vt)
    w.add_key_value("s.raw", b"\xff\xfeok", V.STRING)  # not UTF-8
    w.add_array("a.str", ["a", "", "é", "<0x0A>"])
    w.add_array("a.nested", [[1, 2], [3, 4, 5]])
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(n_tokens)])
    tensors = {
        "f32.2d": (T.F32, rng.standard_normal((3, 8)).astype(np.float32)),
        "f16.1d": (T.F16, rng.standard_normal(16).astype(np.float16)),
        "f32.3d": (T.F32, rng.standard_normal((2, 3, 4)).astype(np.float32)),
    }
    for name, (qt, shape) in {"q8.w": (T.Q8_0, (4, 64)), "q4k.w": (T.Q4_K, (2, 512)),
                              "q41.w": (T.Q4_1, (3, 32)), "q6k.w": (T.Q6_K, (1, 256))}.items():
        bs, ts = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (shape[0], shape[1] // bs * ts), dtype=np.uint8)
        tensors[name] = (qt, raw)
    for name, (qt, arr) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qt if arr.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_writer_round_trip(tmp_path, alignment):
    path = tmp_path / "s.gguf"
    tensors = write_synthetic(path, alignment)
    with GGUFFile(path) as f:
        md = f.metadata
        assert f.alignment == (alignment or 32) and f.version == 3
        assert f.architecture == "llama"
        for key, val, vt in SCALARS:
            assert md.value_type(key) == vt
            if vt == V.FLOAT32:
                assert md[key] == float(np.float32(val))
            else:
                assert md[key] == val and type(md[key]) is type(val), key
        for key, val, vt, dtype in ARRAYS:
            assert md.element_type(key) == vt
            got = md[key]
            assert got.dtype == dtype and np.array_equal(got, np.array(val, dtype=dtype)), key
        assert md["a.str"] == ["a", "", "é", "<0x0A>"]
        assert [a.tolist() for a in md["a.nested"]] == [[1, 2], [3, 4, 5]]
        raw = md["s.raw"]
        assert raw.encode("utf-8", "surrogateescape") == b"\xff\xfeok"
        for name, (qt, arr) in tensors.items():
            t = f.tensors[name]
            assert t.ggml_type == qt
            assert f.tensor_offsets[name] % f.alignment == 0
            if arr.dtype == np.uint8:
                bs, ts = GGML_QUANT_SIZES[qt]
                assert t.shape == (arr.shape[0], arr.shape[1] // ts * bs)
                assert np.array_equal(t.data, arr)
            else:
                assert t.shape == arr.shape
                assert np.array_equal(t.dequantize(), arr.astype(np.float32))
        assert not t.data.flags.writeable
    ref = gguf.GGUFReader(path)
    assert [t.name for t in ref.tensors] == list(tensors)


def test_arrays_decode_lazily_once(tmp_path, monkeypatch):
    path = tmp_path / "s.gguf"
    write_synthetic(path, n_tokens=5000)
    calls = []
    real = GGUFMetadata._decode
    monkeypatch.setattr(GGUFMetadata, "_decode",
                        lambda self, key, lazy: calls.append(key) or real(self, key, lazy))
    f = GGUFFile(path)
    md = f.metadata
    assert md["t.str"] == "héllo ✓" and md.get("general.architecture") == "llama"
    assert "tokenizer.ggml.tokens" in md and md.array_length("tokenizer.ggml.tokens") == 5000
    repr(md)
    assert calls == []
    assert md["tokenizer.ggml.tokens"][4999] == "tok4999"
    assert md["tokenizer.ggml.tokens"][0] == "tok0"
    assert calls == ["tokenizer.ggml.tokens"]
    f.close()


def _write(path, arrays=(), uints=(), tensors=()):
    """A GGUF file of (key, list) arrays, (key, int) uint32 values and (name, ndarray) tensors,
    in that order."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, values in arrays:
        w.add_array(key, values)
    for key, value in uints:
        w.add_uint32(key, value)
    for name, values in tensors:
        w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_long_string_arrays_decode_in_one_piece_as_string_by_string(tmp_path):
    """A vocabulary-sized string array is decoded at once: every string as its own decode
    gives it, across empty strings, lengths past 255, bytes that are not UTF-8 (a character
    cut off at a string's end, a string that starts mid-character); one holding a NUL is
    decoded string by string."""
    rng = np.random.default_rng(1)
    pool = [b"", b"a", "é✓".encode(), b"\xe4\xb8", b"\xad\xe6", b"\xff", b"x" * 300,
            "▁the".encode(), b"<0x00>"]
    strings = [pool[i] for i in rng.integers(0, len(pool), 6000)]
    path = _write(tmp_path / "s.gguf", arrays=[("tokenizer.ggml.tokens", strings),
                                              ("with.nul", strings[:5000] + [b"a\x00b"])])
    with GGUFFile(path) as f:
        want = [b.decode("utf-8", "surrogateescape") for b in strings]
        lazy = f.metadata._values["tokenizer.ggml.tokens"]
        assert _decode_strings(f.metadata._mm, lazy.offset, lazy.string_ends) == want
        assert f.metadata["tokenizer.ggml.tokens"] == want
        assert f.metadata["with.nul"] == want[:5000] + ["a\x00b"]


@pytest.mark.parametrize("odd", ["none", "rare", "many"])
def test_a_vocabularys_string_ends_are_found_as_the_loop_finds_them(tmp_path, monkeypatch,
                                                                    odd):
    """Opening a file finds where a long string array's strings end without a loop per
    string (_chained_ends) wherever they are short; strings of another kind (256 bytes or
    more, empty, a text that starts with a NUL or holds seven zero bytes) are stepped over
    alone, and past _ALONE of them the loop does it all. Either way the ends, the strings
    and what follows the array are the loop's, across windows of _CHAIN_WINDOW bytes."""
    from diptych.quant import gguf_file

    monkeypatch.setattr(gguf_file, "_CHAIN_WINDOW", 1 << 14)    # many windows, few strings
    rng = np.random.default_rng(7)
    strings = [bytes(rng.integers(1, 256, rng.integers(1, 24), dtype=np.uint8))
               for _ in range(6000)]
    kinds = [b"x" * 256, b"y" * 300, b"", b"\x00lead", b"a" + bytes(7) + b"b", b"c" * 255]
    spots = {"none": 0, "rare": 40, "many": 2 * gguf_file._ALONE}[odd]
    for i, at in enumerate(rng.integers(0, len(strings), spots)):
        strings[at] = kinds[i % len(kinds)]
    strings[-1] = kinds[0] if odd != "none" else strings[-1]
    path = _write(tmp_path / "v.gguf", [("tokenizer.ggml.tokens", strings)], [("after.it", 7)])
    with GGUFFile(path) as f:
        chained = f.metadata._values["tokenizer.ggml.tokens"].string_ends
        assert isinstance(chained, np.ndarray) == (odd != "many")
        got = f.metadata["tokenizer.ggml.tokens"], f.metadata["after.it"]
    monkeypatch.setattr(gguf_file, "_chained_ends", lambda *args: None)
    with GGUFFile(path) as f:
        looped = f.metadata._values["tokenizer.ggml.tokens"].string_ends
        assert np.array_equal(np.asarray(chained), np.asarray(looped))
        assert got == (f.metadata["tokenizer.ggml.tokens"], 7)
    assert got[0] == [b.decode("utf-8", "surrogateescape") for b in strings]


def test_a_vocabulary_cut_short_is_the_same_error_either_way(tmp_path, monkeypatch):
    from diptych.quant import gguf_file

    tokens = [b"tok%d" % i for i in range(5000)]
    path = _write(tmp_path / "v.gguf", [("tokenizer.ggml.tokens", tokens)], [("after.it", 7)])
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 2000])   # the array runs past the end
    with pytest.raises(ModelFileError, match="extends past the end of the file"):
        GGUFFile(path)
    monkeypatch.setattr(gguf_file, "_chained_ends", lambda *args: None)
    with pytest.raises(ModelFileError, match="extends past the end of the file"):
        GGUFFile(path)


def test_close_keeps_views_valid_and_rejects_late_array_reads(tmp_path):
    path = tmp_path / "s.gguf"
    tensors = write_synthetic(path)
    with GGUFFile(path) as f:
        t = f.tensors["q8.w"]
        md = f.metadata
    assert np.array_equal(t.data, tensors["q8.w"][1])  # still mapped
    assert md["t.u8"] == 200
    with pytest.raises(ModelFileError, match="closed"):
        md["a.u8"]
    f.close()  # idempotent


def _mapped_rss(path) -> int:
    return sum(m.rss for m in psutil.Process().memory_maps() if m.path == str(path))


@pytest.mark.skipif(not hasattr(mmap.mmap, "madvise"), reason="no madvise on this platform")
def test_release_pages_drops_the_mapping_from_memory_and_keeps_the_data(tmp_path):
    values = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    path = _write(tmp_path / "big.gguf", tensors=[("big.w", values)])
    with GGUFFile(path) as f:
        data = f.tensors["big.w"].data
        assert data.view(np.float32).sum() == values.sum()  # every page read
        assert _mapped_rss(path) >= values.nbytes
        f.release_pages()
        assert _mapped_rss(path) < values.nbytes // 8
        assert np.array_equal(data.view(np.float32).reshape(values.shape), values)
    f.release_pages()  # closed: nothing to release


@pytest.mark.skipif(not hasattr(mmap.mmap, "madvise"), reason="no madvise on this platform")
def test_a_tensors_release_lets_its_own_pages_go_and_no_others(tmp_path):
    """A tensor's `release` drops the mapped pages of its own bytes only: a load calls it
    after each chunk it repacks, and a whole-file release there would walk the page tables
    of every tensor each time."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((1024, 1024)).astype(np.float32) for _ in range(2))  # 4 MiB
    path = _write(tmp_path / "two.gguf", tensors=[("a.w", a), ("b.w", b)])
    with GGUFFile(path) as f:
        ta, tb = f.tensors["a.w"], f.tensors["b.w"]
        assert ta.data.view(np.float32).sum() == a.sum()
        assert tb.data.view(np.float32).sum() == b.sum()
        ta.release()
        assert b.nbytes <= _mapped_rss(path) < b.nbytes + a.nbytes // 8
        tb.release()
        assert _mapped_rss(path) < a.nbytes // 8
        assert np.array_equal(ta.data.view(np.float32).reshape(a.shape), a)


# -- hand-built files for targeted corruptions -------------------------------------------

def _s(text: bytes | str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def build(kvs=None, tensors=None, data=b"", version=3, magic=b"GGUF", n_kv=None,
          n_tensors=None, alignment=32):
    """A GGUF file from parts. kvs: [(key, value_type, payload bytes)];
    tensors: [(name, ggml dims, type, offset)]."""
    kvs = [(b"general.architecture", V.STRING, _s("llama"))] if kvs is None else kvs
    tensors = tensors or []
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kvs) if n_kv is None else n_kv)
    for key, vt, payload in kvs:
        out += _s(key) + struct.pack("<I", vt) + payload
    for name, dims, qt, offset in tensors:
        out += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qt, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def one_tensor(dims=(32, 2), qt=T.F32, offset=0, nbytes=None):
    bs, ts = GGML_QUANT_SIZES[qt]
    n = nbytes if nbytes is not None else int(np.prod(dims)) // bs * ts
    return [("w", dims, qt, offset)], bytes(n)


def test_hand_built_file_parses(tmp_path):
    tensors, data = one_tensor()
    (tmp_path / "ok.gguf").write_bytes(build(tensors=tensors, data=data))
    with GGUFFile(tmp_path / "ok.gguf") as f:
        assert f.tensors["w"].shape == (2, 32) and f.version == 3


def _expect(tmp_path, blob, exc=ModelFileError, match=None):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(exc, match=match) as info:
        GGUFFile(path)
    assert type(info.value) is exc
    assert str(path) in str(info.value)


T32 = struct.pack("<I", 7)


@pytest.mark.parametrize("case", [
    "bad_magic", "v1", "v99", "v0", "huge_kv_count", "huge_tensor_count", "huge_key_len",
    "huge_string_value", "huge_array_count", "huge_string_in_array", "unknown_value_type",
    "unknown_array_type", "duplicate_key", "bad_utf8_key", "alignment_zero",
    "alignment_not_pow2", "alignment_string", "too_many_dims", "row_not_whole_blocks",
    "data_past_eof", "misaligned_offset", "overlap", "duplicate_tensor", "truncated_counts",
    "deep_nesting",
])
def test_corrupt_inputs_raise_model_file_error(tmp_path, case):
    arch = (b"general.architecture", V.STRING, _s("llama"))
    tensors, data = one_tensor()
    blobs = {
        "bad_magic": build(magic=b"GGML"),
        "v1": build(version=1),
        "v99": build(version=99),
        "v0": build(version=0),
        "huge_kv_count": build(n_kv=2**63),
        "huge_tensor_count": build(n_tensors=2**64 - 1),
        "huge_key_len": build()[:24] + struct.pack("<Q", 2**62) + b"x" * 64,
        "huge_string_value": build([(b"k", V.STRING, struct.pack("<Q", 2**60) + b"abc")]),
        "huge_array_count": build([(b"k", V.ARRAY, struct.pack("<IQ", V.UINT8, 2**40))]),
        "huge_string_in_array": build([(b"k", V.ARRAY, struct.pack("<IQ", V.STRING, 2)
                                        + _s("ok") + struct.pack("<Q", 2**63) + b"zz")]),
        "unknown_value_type": build([(b"k", 13, T32)]),
        "unknown_array_type": build([(b"k", V.ARRAY, struct.pack("<IQ", 99, 1) + T32)]),
        "duplicate_key": build([arch, arch]),
        "bad_utf8_key": build([(b"k\xff", V.UINT32, T32)]),
        "alignment_zero": build([(b"general.alignment", V.UINT32, struct.pack("<I", 0))]),
        "alignment_not_pow2": build([(b"general.alignment", V.UINT32, struct.pack("<I", 48))]),
        "alignment_string": build([(b"general.alignment", V.STRING, _s("32"))]),
        "too_many_dims": build(tensors=[("w", (1, 1, 1, 1, 1), T.F32, 0)], data=bytes(4)),
        "row_not_whole_blocks": build(tensors=[("w", (33, 1), T.Q8_0, 0)], data=bytes(64)),
        "data_past_eof": build(tensors=tensors, data=data[:-1]),
        "misaligned_offset": build(tensors=[("w", (4,), T.F32, 16)], data=bytes(64)),
        "overlap": build(tensors=[("a", (16,), T.F32, 0), ("b", (16,), T.F32, 32)],
                         data=bytes(128)),
        "duplicate_tensor": build(tensors=[("a", (8,), T.F32, 0), ("a", (8,), T.F32, 32)],
                                  data=bytes(64)),
        "truncated_counts": build()[:15],
        "deep_nesting": build([(b"k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 20
                                + struct.pack("<IQ", V.UINT8, 0))]),
    }
    _expect(tmp_path, blobs[case])


def test_unknown_tensor_type_is_unsupported(tmp_path):
    blob = build(tensors=[("w", (32,), 4, 0)], data=bytes(64))  # 4: the removed Q4_2
    _expect(tmp_path, blob, UnsupportedModelError, match="unknown ggml type 4")


def test_big_endian_is_unsupported(tmp_path):
    blob = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    _expect(tmp_path, blob, UnsupportedModelError, match="big-endian")


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        GGUFFile(tmp_path / "empty.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        GGUFFile(tmp_path)
    (tmp_path / "short.gguf").write_bytes(b"GG")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        GGUFFile(tmp_path / "short.gguf")


def test_version_messages(tmp_path):
    _expect(tmp_path, build(version=1), match="version 1")
    _expect(tmp_path, build(version=99), match="unsupported GGUF version 99")


def test_version_2_and_u64_metadata_ints(tmp_path):
    kvs = [(b"general.architecture", V.STRING, _s("llama")),
           (b"llama.block_count", V.UINT64, struct.pack("<Q", 30)),
           (b"llama.context_length", V.INT32, struct.pack("<i", 8192)),
           (b"general.alignment", V.UINT64, struct.pack("<Q", 16))]
    tensors = [("w", (4,), T.F32, 0), ("v", (4,), T.F32, 16)]
    (tmp_path / "v2.gguf").write_bytes(build(kvs, tensors, bytes(32), version=2, alignment=16))
    with GGUFFile(tmp_path / "v2.gguf") as f:
        assert f.version == 2 and f.alignment == 16
        assert f.metadata["llama.block_count"] == 30 and f.metadata["llama.context_length"] == 8192
        assert f.tensor_offsets["v"] - f.tensor_offsets["w"] == 16


# -- fuzzing: truncations and byte flips --------------------------------------------------

def _parse_fully(path):
    """Open, decode every metadata value, dequantize every supported tensor."""
    with GGUFFile(path) as f, np.errstate(all="ignore"):  # garbage scales may be NaN
        for key in f.metadata:
            f.metadata[key]
        for t in f.tensors.values():
            if t.ggml_type in SUPPORTED_TYPES and t.n_elements <= 1 << 16:
                t.dequantize()


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    write_synthetic(path, n_tokens=20)
    blob = path.read_bytes()
    with GGUFFile(path) as f:
        data_end = max(f.tensor_offsets[n] + t.nbytes for n, t in f.tensors.items())
    return blob, data_end


def test_truncated_at_random_offsets(tmp_path, small_file):
    blob, data_end = small_file
    rng = np.random.default_rng(1234)
    cuts = sorted(set(rng.integers(1, len(blob), 150).tolist()) | set(range(1, 64)))
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(blob[:cut])
        if cut < data_end:
            with pytest.raises(ModelFileError):
                GGUFFile(path)
        else:  # only the final padding is missing
            _parse_fully(path)


def test_random_byte_flips(tmp_path, small_file):
    blob, _ = small_file
    rng = np.random.default_rng(99)
    path = tmp_path / "flip.gguf"
    span = min(4096, len(blob))
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        data = bytearray(blob)
        for pos in rng.integers(4, span, rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            _parse_fully(path)
            outcomes["ok"] += 1
        except (ModelFileError, UnsupportedModelError):
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
