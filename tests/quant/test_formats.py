"""The quant-format table against gguf-py, and the one-definition rule for grids/codebooks."""

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from diptych.errors import UnsupportedModelError
from diptych.quant import dequant as dq
from diptych.quant.formats import FORMATS, QUANT_TYPES, quant_format

SOURCE_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("runtime", "backends", "quant", "tui", "benchmarks", "scripts")
QUANT = list(QUANT_TYPES)


def test_every_supported_type_has_a_format_and_a_dequantizer():
    assert set(FORMATS) == set(dq.SUPPORTED_TYPES)
    assert {t.name for t in FORMATS} == {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                         "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                         "IQ4_NL"}


@pytest.mark.parametrize("ggml_type", list(FORMATS), ids=lambda t: t.name)
def test_sizes_agree_with_gguf_py(ggml_type):
    f = FORMATS[ggml_type]
    assert (f.block_size, f.type_size) == GGML_QUANT_SIZES[ggml_type]
    assert f.row_bytes(3 * f.block_size) == 3 * GGML_QUANT_SIZES[ggml_type][1]


@pytest.mark.parametrize("ggml_type", QUANT, ids=lambda t: t.name)
def test_fields_tile_the_block_and_hold_the_code_bits(ggml_type):
    f = FORMATS[ggml_type]
    fields = sorted((x for x in (f.d, f.m, f.scales, f.qs, f.qh) if x), key=lambda x: x.offset)
    assert fields[0].offset == 0 and fields[-1].end == f.type_size
    assert all(a.end == b.offset for a, b in zip(fields, fields[1:]))  # no gap, no overlap
    code_bytes = f.qs.size + (f.qh.size if f.qh else 0)
    assert 8 * code_bytes == f.block_size * f.code_bits
    assert f.block_size % f.unit == 0
    assert (f.scales is not None) == (f.unit < f.block_size)


@pytest.mark.parametrize("ggml_type", QUANT, ids=lambda t: t.name)
def test_d_and_m_fields_scale_gguf_py_dequantize(ggml_type):
    """Doubling the fp16 fields the table names d and m doubles gguf-py's values exactly:
    the offsets are where gguf-py reads the scale and the min."""
    f = FORMATS[ggml_type]
    rng = np.random.default_rng(int(ggml_type))
    blocks = rng.integers(0, 256, (64, f.type_size), dtype=np.uint8)
    halves = [x for x in (f.d, f.m) if x]
    for field in halves:
        blocks[:, field.slice] = rng.uniform(0.25, 1, 64).astype(np.float16).view(
            np.uint8).reshape(64, 2)
    ref = gguf.quants.dequantize(blocks, ggml_type)
    doubled = blocks.copy()
    for field in halves:
        value = blocks[:, field.slice].copy().view(np.float16) * np.float16(2)
        doubled[:, field.slice] = value.view(np.uint8)
    assert np.array_equal(gguf.quants.dequantize(doubled, ggml_type), 2 * ref)
    assert np.abs(ref).max() > 0


def test_code_offsets_and_codebook_match_gguf_py():
    """A block whose codes are all zero dequantizes to d * code_offset (d * codebook[0])."""
    for t in QUANT:
        f = FORMATS[t]
        if f.has_bias or f.scales is not None:
            continue
        block = np.zeros((1, f.type_size), np.uint8)
        block[:, f.d.slice] = np.array([1.0], np.float16).view(np.uint8)
        want = f.codebook[0] if f.codebook is not None else f.code_offset
        assert np.all(gguf.quants.dequantize(block, t) == np.float32(want)), t.name
    iq4 = FORMATS[T.IQ4_NL]
    for i, value in enumerate(iq4.codebook):
        block = np.zeros((1, iq4.type_size), np.uint8)
        block[:, iq4.d.slice] = np.array([1.0], np.float16).view(np.uint8)
        block[:, iq4.qs.offset] = i  # element 0's nibble
        assert gguf.quants.dequantize(block, T.IQ4_NL)[0, 0] == value


def test_unknown_and_unsupported_types_raise():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        quant_format(T.IQ2_XXS)
    with pytest.raises(UnsupportedModelError, match="4"):
        quant_format(4)  # the removed Q4_2 type id


def _sources():
    for d in PACKAGE_DIRS:
        yield from (SOURCE_ROOT / d).rglob("*.py")


@pytest.mark.parametrize("ggml_type", [t for t in QUANT if FORMATS[t].codebook is not None],
                         ids=lambda t: t.name)
def test_each_codebook_is_defined_once_in_the_source_tree(ggml_type):
    values = [int(v) for v in FORMATS[ggml_type].codebook]
    pattern = re.compile(r"\s*,\s*".join(re.escape(str(v)) for v in values))
    where = [p.relative_to(SOURCE_ROOT).as_posix() for p in _sources()
             if pattern.search(p.read_text(encoding="utf-8"))]
    assert where == ["quant/formats.py"]


def test_describe_names_the_layout():
    assert FORMATS[T.Q4_K].describe() == (
        "Q4_K: blocks of 256 in 144 bytes (4.5 bits/weight), 4-bit codes, 8 sub-blocks of 32 "
        "(6-bit scale+min x8 scales), with mins")
    assert "16-value codebook" in FORMATS[T.IQ4_NL].describe()
    assert FORMATS[T.F16].describe() == "F16: 16-bit floats"
