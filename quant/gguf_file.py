"""Read a GGUF file: header, metadata, tensor table; tensor data memory-mapped.

Why a hand-written parser: `gguf.GGUFReader` turns every metadata string into numpy
objects in Python at open time, so opening a file with a large vocabulary takes seconds
(this module: milliseconds).

Opening walks the metadata once (string arrays are skipped by reading their length
prefixes only), parses the tensor table and maps the file; it reads no tensor data.
Metadata arrays are decoded on first access, once; a long string array (a vocabulary, its
merges) in one piece, from the string ends its walk at open noted. gguf-py remains the
source of the constants (`GGMLQuantizationType`, `GGML_QUANT_SIZES`, `GGUFValueType`).

Strings: keys and tensor names must be valid UTF-8 (otherwise the file is rejected).
String *values* are decoded as UTF-8 with ``errors="surrogateescape"``: valid UTF-8 (all
known vocabularies) decodes exactly as usual, and a token that is not valid UTF-8 (some
byte-level vocabularies hold partial characters) keeps its bytes losslessly, recoverable
with ``s.encode("utf-8", "surrogateescape")``. Code that hands such strings to a strict
consumer (Rust `tokenizers`, a terminal) must convert them first.

Every problem with the file raises `ModelFileError` (missing, not GGUF, unsupported
version, truncated, corrupt counts/lengths/offsets) or `UnsupportedModelError` (a tensor
type unknown to gguf-py, a big-endian file); every length read from the file is bounded
by the bytes that remain, so a corrupt file never allocates huge buffers or loops long.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from array import array
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from diptych.errors import DiptychError, ModelFileError, UnsupportedModelError
from .tensor import QuantTensor

__all__ = ["GGUFFile", "GGUFMetadata", "GGUF_MAGIC", "DEFAULT_ALIGNMENT", "SUPPORTED_VERSIONS"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Fixed-size value types: struct format (scalars), numpy dtype (arrays), size in bytes.
_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),  # decoded as `!= 0`
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_INT_TYPES = frozenset({
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
})
# The fewest bytes one array element of each kind can take (bounds array counts).
_STRING_MIN = 8       # u64 length, empty string
# String arrays at least this long (vocabularies, merges) are decoded in one piece: their
# string ends are noted while opening walks them anyway.
_BULK_STRINGS = 4096
_CHAIN_WINDOW = 1 << 20   # bytes of a string array _chained_ends looks at in one go
_ALONE = 1024             # strings _chained_ends steps over one by one before it gives up
_ARRAY_MIN = 12       # u32 element type + u64 count, empty array


def _min_size(vtype: GGUFValueType) -> int:
    if vtype == GGUFValueType.STRING:
        return _STRING_MIN
    if vtype == GGUFValueType.ARRAY:
        return _ARRAY_MIN
    return _SCALAR_FORMATS[vtype].size


class _LazyArray:
    """A metadata array not yet decoded: where it lies and what it holds."""

    __slots__ = ("elem_type", "count", "offset", "string_ends")

    def __init__(self, elem_type: GGUFValueType, count: int, offset: int):
        self.elem_type = elem_type
        self.count = count
        self.offset = offset  # first element (after the element type and count)
        # a long string array's: where each string ends (int64s: a numpy or an array("q"))
        self.string_ends: np.ndarray | array | None = None


def _chained_ends(mm: mmap.mmap, pos: int, count: int, file_size: int) -> np.ndarray | None:
    """Where each of the `count` strings from `pos` ends, found mostly without a loop per
    string, or None (opening then walks them one by one, which also reports a bad length).

    A string of 1-255 bytes starts with its length byte and seven zero bytes; in a
    vocabulary, zero runs of exactly seven are such length fields and next to nothing else.
    The runs are found with numpy a window at a time and chained: a run counts only where
    the string before it ends, and bytes 1-7 of such a field are zero, so its first byte
    is the whole length: every end found is the end the loop would find. Where the chain
    breaks (a longer or empty string, a text starting with a NUL), that one string is
    stepped over alone; more than _ALONE of those and the loop is left to do it all."""
    u8 = np.frombuffer(mm, dtype=np.uint8)
    pieces, done, alone = [], 0, 0
    while done < count:
        b = u8[pos:min(file_size, pos + _CHAIN_WINDOW)]
        edges = np.diff((b == 0).view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts = np.flatnonzero(edges == 1)
        runs = starts[np.flatnonzero(edges == -1) - starts == 7] - 1   # length fields
        ends = runs + 8 + b[runs]                        # where each one's string ends
        breaks = np.flatnonzero(ends[:-1] != runs[1:])   # run i + 1 does not follow run i
        at = 0                                           # the next string, from pos
        while done < count:
            j = int(np.searchsorted(runs, at))
            if j < len(runs) and runs[j] == at:          # a chain of fields from here
                k = int(np.searchsorted(breaks, j))
                last = min(int(breaks[k]) if k < len(breaks) else len(runs) - 1,
                           j + count - done - 1)
                pieces.append(ends[j:last + 1] + pos)
                done += last + 1 - j
                at = int(ends[last])
                if last == len(runs) - 1:
                    break
            else:                                        # a string of another kind, alone
                if at + 8 > len(b):                      # its length field: next window
                    break
                alone += 1
                if alone > _ALONE:
                    break
                at += 8 + int.from_bytes(b[at:at + 8].tobytes(), "little")
                pieces.append(np.array([pos + at]))
                done += 1
                if at > len(b):
                    break
        if at == 0 or alone > _ALONE or pos + at > file_size:
            return None
        pos += at
    return np.concatenate(pieces)


def _decode_strings(mm: mmap.mmap, start: int, ends) -> list[str] | None:
    """The strings of an array that starts at `start` and whose strings end at `ends`, decoded
    at once: each 8-byte length becomes one NUL, the whole decodes as one UTF-8 text and splits
    at the NULs (a string that is not valid UTF-8 escapes the same bytes as alone: a NUL ends
    any sequence). None when a string holds a NUL itself."""
    count = len(ends)
    ends_np = np.frombuffer(ends, dtype=np.int64)
    heads = np.empty(count, dtype=np.int64)      # each length prefix, from `start`
    heads[0] = 0
    heads[1:] = ends_np[:-1] - start
    raw = np.frombuffer(mm, dtype=np.uint8, count=int(ends_np[-1]) - start, offset=start).copy()
    keep = np.ones(len(raw), dtype=bool)
    for k in range(1, 8):
        keep[heads + k] = False
    raw[heads] = 0
    data = raw[keep].tobytes()
    if data.count(0) != count:
        return None
    return data.decode("utf-8", "surrogateescape").split("\0")[1:]


def _decode_array(mm: mmap.mmap, elem_type: GGUFValueType, count: int,
                  pos: int) -> tuple[Any, int]:
    """Decode an array that was validated at open; returns (value, offset after it). A string
    array goes string by string (`_decode_strings` takes the large ones)."""
    if elem_type in _ARRAY_DTYPES:
        dtype = _ARRAY_DTYPES[elem_type]
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=pos).copy()
        if elem_type == GGUFValueType.BOOL:
            arr = arr != 0
        return arr, pos + count * dtype.itemsize
    if elem_type == GGUFValueType.STRING:
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            n = unpack(mm, pos)[0]
            pos += 8
            append(mm[pos:pos + n].decode("utf-8", "surrogateescape"))
            pos += n
        return out, pos
    out = []
    for _ in range(count):
        sub_type = GGUFValueType(_U32.unpack_from(mm, pos)[0])
        sub_count = _U64.unpack_from(mm, pos + 4)[0]
        value, pos = _decode_array(mm, sub_type, sub_count, pos + 12)
        out.append(value)
    return out, pos


class GGUFMetadata(Mapping):
    """The key/value metadata of a GGUF file, as a read-only Mapping.

    Scalars are decoded at open: integers as `int` (u8..u64 and i8..i64 alike), floats as
    `float`, bools as `bool`, strings as `str`. Arrays are decoded on first access and then
    cached: string arrays to `list[str]`, numeric arrays to a numpy array (little-endian
    native dtype; bool arrays as `np.bool_`), arrays of arrays to a list. `in`, `len`,
    iteration over keys, `value_type`, `element_type` and `array_length` never decode an
    array; `values()`/`items()` decode all of them.
    """

    def __init__(self, path: Path, mm: mmap.mmap, values: dict[str, Any],
                 types: dict[str, GGUFValueType]):
        self._path = path
        self._mm: mmap.mmap | None = mm  # None once the file is closed
        self._values = values
        self._types = types
        self._array_types: dict[str, GGUFValueType] = {}

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, _LazyArray):
            value = self._decode(key, value)
            self._values[key] = value
        return value

    def take(self, key: str) -> Any:
        """metadata[key], an array decoded afresh and not kept: for a large array that its
        reader copies into its own form (a BPE merge list: 151,000 strings for Qwen2.5).
        KeyError if absent."""
        value = self._values[key]
        return self._decode(key, value) if isinstance(value, _LazyArray) else value

    def _decode(self, key: str, lazy: _LazyArray) -> Any:
        if self._mm is None:
            raise ModelFileError(f"{self._path}: closed before metadata array {key!r} was read")
        self._array_types[key] = lazy.elem_type
        if lazy.string_ends is not None:
            strings = _decode_strings(self._mm, lazy.offset, lazy.string_ends)
            if strings is not None:
                return strings
        return _decode_array(self._mm, lazy.elem_type, lazy.count, lazy.offset)[0]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def is_decoded(self, key: str) -> bool:
        """False while `key` is an array that nobody has read yet."""
        return not isinstance(self._values[key], _LazyArray)

    def value_type(self, key: str) -> GGUFValueType:
        """The GGUF value type of `key` (ARRAY for arrays)."""
        return self._types[key]

    def element_type(self, key: str) -> GGUFValueType | None:
        """The element type of an array value (without decoding it); None for scalars."""
        if self._types[key] != GGUFValueType.ARRAY:
            return None
        value = self._values[key]
        if isinstance(value, _LazyArray):
            return value.elem_type
        return self._array_types[key]

    def array_length(self, key: str) -> int:
        """The number of elements of an array value, without decoding it."""
        if self._types[key] != GGUFValueType.ARRAY:
            raise TypeError(f"metadata {key!r} is a {self._types[key].name}, not an array")
        value = self._values[key]
        return value.count if isinstance(value, _LazyArray) else len(value)

    def __repr__(self) -> str:
        parts = []
        for key, value in self._values.items():
            if isinstance(value, _LazyArray):
                shown = f"<{value.count} x {value.elem_type.name}>"
            elif isinstance(value, (list, np.ndarray)):
                shown = f"<{len(value)} x {self.element_type(key).name}>"
            else:
                shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            parts.append(f"{key}: {shown}")
        return "GGUFMetadata({" + ", ".join(parts) + "})"


class GGUFFile:
    """A parsed GGUF (v2/v3) file whose tensor data stays memory-mapped.

    >>> with GGUFFile("model.gguf") as f:
    ...     f.architecture, f.metadata["llama.block_count"], f.tensors["output.weight"].shape

    Attributes: `path`, `version`, `alignment`, `metadata` (GGUFMetadata), `tensors`
    (dict name -> QuantTensor in file order, shapes row-major, `data` a read-only uint8 view
    (n_rows, row_bytes) into the mapping), `data_offset` (start of the tensor data section),
    `tensor_offsets` (dict name -> absolute byte offset of each tensor's data), `file_size`.

    `close()` drops this object's hold on the mapping; tensor views a caller still holds
    stay valid (the mapping is released when the last one is garbage-collected).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.tensors: dict[str, QuantTensor] = {}
        self.tensor_offsets: dict[str, int] = {}
        self._mm: mmap.mmap | None = None
        self._u8: np.ndarray | None = None
        self._pos = 0
        try:
            with open(self.path, "rb") as fh:
                self.file_size = os.fstat(fh.fileno()).st_size
                if self.file_size == 0:
                    raise self._error("the file is empty, not a GGUF model")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelFileError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ModelFileError(f"{self.path}: is a directory, not a GGUF file") from None
        except PermissionError:
            raise ModelFileError(f"{self.path}: permission denied") from None
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: cannot read ({exc})") from None
        try:
            self._parse()
        except DiptychError:
            self.close()
            raise
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeDecodeError) as exc:
            # Safety net: every check above should have caught it first.
            self.close()
            raise self._error(f"corrupt GGUF file ({type(exc).__name__}: {exc})") from exc

    # -- public -----------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """`general.architecture` (e.g. "llama", "qwen2"); ModelFileError if absent."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise self._error("metadata has no general.architecture string")
        return arch

    def release_pages(self, start: int = 0, length: int | None = None) -> None:
        """Let the OS take back the mapped pages of bytes start .. start + length (None: to
        the end of the file) this process has read (the page cache keeps them; a later read
        maps them again). Loading calls it as tensors are repacked, so the repacked copy and
        the mapped file are not both resident; each tensor's `release` is this call on its
        own bytes (the kernel walks the page tables of the whole range each time)."""
        if self._mm is not None and hasattr(self._mm, "madvise") and start < self.file_size:
            first = start - start % mmap.PAGESIZE
            if length is None:
                self._mm.madvise(mmap.MADV_DONTNEED, first)
            elif length:
                self._mm.madvise(mmap.MADV_DONTNEED, first, start + length - first)

    def close(self) -> None:
        """Release this object's mapping (views already handed out stay valid)."""
        mm, self._mm = self._mm, None
        self.tensors = {}
        self._u8 = None
        if hasattr(self, "metadata"):
            self.metadata._mm = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views are still alive; the mapping goes when they do

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)")

    # -- parsing ----------------------------------------------------------------------

    def _error(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.file_size:
            raise self._error(
                f"truncated or corrupt: {what} needs {n} bytes at offset {self._pos}, "
                f"but the file has {self.file_size} bytes")

    def _u32(self, what: str) -> int:
        self._need(4, what)
        value = _U32.unpack_from(self._mm, self._pos)[0]
        self._pos += 4
        return value

    def _u64(self, what: str) -> int:
        self._need(8, what)
        value = _U64.unpack_from(self._mm, self._pos)[0]
        self._pos += 8
        return value

    def _raw_string(self, what: str) -> bytes:
        n = self._u64(f"length of {what}")
        self._need(n, what)
        data = self._mm[self._pos:self._pos + n]
        self._pos += n
        return data

    def _name(self, what: str) -> str:
        raw = self._raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(f"{what} is not valid UTF-8: {raw[:40]!r}") from None

    def _count(self, what: str, min_size: int) -> int:
        n = self._u64(what)
        remaining = self.file_size - self._pos
        if n * min_size > remaining:
            raise self._error(
                f"corrupt {what}: {n} entries cannot fit in the {remaining} bytes that remain")
        return n

    def _value_type(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._error(f"metadata {key!r} has unknown value type {raw}") from None

    def _parse(self) -> None:
        mm = self._mm
        if self.file_size < 4 or mm[:4] != GGUF_MAGIC:
            raise self._error(f"not a GGUF file (starts with {mm[:4]!r}, expected b'GGUF')")
        self._pos = 4
        version = self._u32("version")
        if version & 0xFFFF == 0 and version != 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise UnsupportedModelError(f"{self.path}: big-endian GGUF files are not supported")
        if version == 1:
            raise self._error("GGUF version 1 (2023) is not supported; convert the model again "
                              "with a current llama.cpp (versions 2 and 3 are read)")
        if version not in SUPPORTED_VERSIONS:
            raise self._error(f"unsupported GGUF version {version} (versions 2 and 3 are read)")
        self.version = version
        n_tensors = self._count("tensor count", 24)
        n_kv = self._count("metadata key/value count", 13)

        values: dict[str, Any] = {}
        types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = self._name(f"metadata key #{i}")
            if key in values:
                raise self._error(f"duplicate metadata key {key!r}")
            vtype = self._value_type(self._u32(f"type of metadata {key!r}"), key)
            types[key] = vtype
            values[key] = self._read_value(vtype, key)
        self.metadata = GGUFMetadata(self.path, mm, values, types)

        self.alignment = self._read_alignment(values, types)
        infos = [self._read_tensor_info(i) for i in range(n_tensors)]
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self._u8 = np.frombuffer(mm, dtype=np.uint8)
        self._build_tensors(infos)

    def _read_value(self, vtype: GGUFValueType, key: str) -> Any:
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            self._need(fmt.size, f"value of metadata {key!r}")
            value = fmt.unpack_from(self._mm, self._pos)[0]
            self._pos += fmt.size
            return bool(value) if vtype == GGUFValueType.BOOL else value
        if vtype == GGUFValueType.STRING:
            return self._raw_string(f"value of metadata {key!r}").decode("utf-8", "surrogateescape")
        # ARRAY: remember where it is, skip it (validating every length on the way).
        elem_type = self._value_type(self._u32(f"element type of metadata {key!r}"), key)
        count = self._count(f"length of metadata array {key!r}", _min_size(elem_type))
        lazy = _LazyArray(elem_type, count, self._pos)
        if elem_type == GGUFValueType.STRING and count >= _BULK_STRINGS:
            lazy.string_ends = _chained_ends(self._mm, self._pos, count, self.file_size)
            if lazy.string_ends is not None:
                self._pos = int(lazy.string_ends[-1])
                return lazy
            lazy.string_ends = array("q")
        self._skip_array(elem_type, count, key, 1, lazy.string_ends)
        return lazy

    def _skip_array(self, elem_type: GGUFValueType, count: int, key: str, depth: int,
                    string_ends: array | None = None) -> None:
        """Past the array, every length checked; a string array's string ends go into
        `string_ends` if given."""
        if elem_type in _SCALAR_FORMATS:
            self._pos += count * _SCALAR_FORMATS[elem_type].size  # bounded by _count
        elif elem_type == GGUFValueType.STRING:
            # The hot loop of opening a file (vocabularies): lengths only, checked at the end;
            # a bad length makes the next unpack fail or the end land past the file.
            unpack, pos, end = _U64.unpack_from, self._pos, self.file_size
            mm = self._mm
            try:
                if string_ends is None:
                    for _ in range(count):
                        pos += 8 + unpack(mm, pos)[0]
                else:
                    record = string_ends.append
                    for _ in range(count):
                        pos += 8 + unpack(mm, pos)[0]
                        record(pos)
            except (struct.error, OverflowError):
                pos = end + 1
            if pos > end:
                raise self._error(f"truncated or corrupt: a string in metadata array {key!r} "
                                  f"extends past the end of the file")
            self._pos = pos
        else:  # nested arrays
            if depth >= MAX_ARRAY_NESTING:
                raise self._error(f"metadata array {key!r} is nested too deeply")
            for _ in range(count):
                sub_type = self._value_type(self._u32(f"element type in metadata {key!r}"), key)
                sub_count = self._count(f"length of an array in metadata {key!r}",
                                        _min_size(sub_type))
                self._skip_array(sub_type, sub_count, key, depth + 1)

    def _read_alignment(self, values: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
        if "general.alignment" not in values:
            return DEFAULT_ALIGNMENT
        align = values["general.alignment"]
        if types["general.alignment"] not in _INT_TYPES:
            raise self._error(f"general.alignment must be an integer, "
                              f"not a {types['general.alignment'].name}")
        if align <= 0 or align & (align - 1):
            raise self._error(f"general.alignment {align} is not a positive power of two")
        return align

    def _read_tensor_info(self, i: int) -> tuple:
        name = self._name(f"name of tensor #{i}")
        n_dims = self._u32(f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise self._error(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        self._need(8 * n_dims, f"dimensions of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", self._mm, self._pos)
        self._pos += 8 * n_dims
        raw_type = self._u32(f"type of tensor {name!r}")
        offset = self._u64(f"data offset of tensor {name!r}")
        return name, dims, raw_type, offset

    def _build_tensors(self, infos: list[tuple]) -> None:
        spans = []
        for name, dims, raw_type, offset in infos:
            if name in self.tensors:
                raise self._error(f"duplicate tensor name {name!r}")
            try:
                ggml_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has unknown ggml type {raw_type} "
                    f"(not known to gguf-py)") from None
            # ggml order is innermost first; ours is row-major. A 0-d tensor is one element.
            shape = tuple(reversed(dims)) if dims else (1,)
            n_cols = shape[-1]
            if n_cols % block_size:
                raise self._error(
                    f"tensor {name!r}: row length {n_cols} is not a multiple of the "
                    f"{ggml_type.name} block size {block_size}")
            n_rows = 1
            for d in shape[:-1]:
                n_rows *= d
            row_bytes = n_cols // block_size * type_size
            nbytes = n_rows * row_bytes
            if offset % self.alignment:
                raise self._error(f"tensor {name!r}: data offset {offset} is not a multiple of "
                                  f"the alignment {self.alignment}")
            start = self.data_offset + offset
            end = start + nbytes
            if end > self.file_size:
                raise self._error(
                    f"tensor {name!r} ({ggml_type.name} {shape}) data spans bytes {start}..{end} "
                    f"but the file has {self.file_size} bytes (truncated?)")
            if nbytes:
                spans.append((start, end, name))
            data = self._u8[start:end].reshape(n_rows, row_bytes)
            self.tensors[name] = QuantTensor(name, ggml_type, shape, data,
                                             functools.partial(self.release_pages, start, nbytes))
            self.tensor_offsets[name] = start
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise self._error(f"tensors {n0!r} (bytes {s0}..{e0}) and {n1!r} "
                                  f"(bytes {s1}..{e1}) overlap")
