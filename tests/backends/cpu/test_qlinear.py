"""QuantLinear (backends/torch/qlinear.py): the CPU quantized linear against gguf-py's oracle.

Every block type, shapes that are not multiples of the 64-row groups (a tail group, and a
weight with only a tail), every compute path (fused GEMV per row, the register-blocked
gemm_s, fp32 tiles + torch.mm) for any M, gemm_s's blocks of rows, each range of the
dispatch table, bit-exact dequantization and row lookup, memory held.

Accuracy bound. Each output is a dot product of K fp32 products accumulated in fp32 (in blocks
of 16-32 terms, then unit by unit; or by MKL). The standard bound for such a sum is
|y - y_exact| <= gamma * sum_k |x_k w_k| with gamma ~ depth * eps32, where the depth of the
summation tree is at most a few + K/16 here. We assert max |y - y_ref| / sum_k |x_k w_k| <=
(8 + K/16) * eps32 (at most 40 eps, 4.8e-6, for K = 512), per output element, against a
float64 reference on the exactly dequantized weights. Quantizing x to 8 bits (llama.cpp's
way) would miss this by 3-4 orders of magnitude.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from diptych.backends.torch.cpu import kernel_cache
from diptych.backends.torch.cpu import qlinear as qlm
from diptych.backends.torch.cpu.embedding_table import EmbeddingTable
from diptych.backends.torch.cpu.qlinear import QuantLinear
from diptych.quant import QuantTensor

EPS32 = float(np.finfo(np.float32).eps)

# byte offsets of the fp16 fields of each block: random bytes there are often NaN/inf
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANT = list(F16_FIELDS)
FLOAT = [T.F32, T.F16, T.BF16]
M_VALUES = [1, 3, 17, 64]


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernels():
    """Compile all kernels up front, in parallel processes (numba compiles one function at a
    time, ~1-3 s each); a no-op once numba's on-disk cache holds them."""
    kernel_cache.precompile(processes=2)


def random_data(t: T, n: int, k: int, rng: np.random.Generator, wide: bool = False) -> np.ndarray:
    """Raw rows (n, row_bytes) of random blocks with finite fp16 scales. wide=True draws the
    scales from every finite half (zeros, subnormals, negatives, up to 65504)."""
    if t == T.F32:
        return rng.standard_normal((n, k), dtype=np.float32).view(np.uint8)
    if t == T.F16:
        return rng.standard_normal((n, k), dtype=np.float32).astype(np.float16).view(np.uint8)
    if t == T.BF16:
        f = rng.standard_normal((n, k), dtype=np.float32)
        return gguf.quants.quantize(f, T.BF16).view(np.uint8).reshape(n, -1)
    bs, ts = GGML_QUANT_SIZES[t]
    nb = n * (k // bs)
    blocks = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        if wide:
            half = rng.integers(0, 1 << 16, nb, dtype=np.uint32).astype(np.uint16)
            half[(half & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)  # inf/NaN -> finite
        else:
            half = (rng.standard_normal(nb) * 0.05).astype(np.float16).view(np.uint16)
        blocks[:, off:off + 2] = half.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(n, -1)


def oracle(data: np.ndarray, t: T, n: int, k: int) -> np.ndarray:
    if t == T.F32:
        return data.view(np.float32).reshape(n, k)
    if t == T.F16:
        return data.view(np.float16).astype(np.float32).reshape(n, k)
    return np.asarray(gguf.quants.dequantize(data, t), dtype=np.float32).reshape(n, k)


def k_for(t: T) -> int:
    """A row length of a few blocks (not a multiple of any tile size)."""
    bs = GGML_QUANT_SIZES[t][0]
    return 2 * bs if bs == 256 else (5 * bs if bs == 32 else 80)


def make(t: T, n: int, k: int, seed: int = 0, wide: bool = False):
    rng = np.random.default_rng(seed)
    data = random_data(t, n, k, rng, wide)
    return QuantLinear.from_quant_tensor(QuantTensor("w", t, (n, k), data)), oracle(data, t, n, k)


def assert_close(y: torch.Tensor, x: np.ndarray, w: np.ndarray) -> None:
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    k = x.shape[1]
    bound = (8 + k / 16) * EPS32
    got = y.numpy().astype(np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref) / np.where(scale > 0, scale, 1.0)
    assert np.isfinite(got).all()
    assert err.max() <= bound, f"relative error {err.max():.3g} > bound {bound:.3g}"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| over the whole tensor (Frobenius norms)."""
    return float((got - want).norm() / want.norm())


# -- forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("t", QUANT + FLOAT, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [165, 37, 128])  # 2 groups of 64 + a tail; a tail only; no tail
def test_forward_matches_float64_reference(t, n):
    k = k_for(t)
    ql, w = make(t, n, k, seed=n)
    rng = np.random.default_rng(1)
    for m in M_VALUES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = ql.forward(torch.from_numpy(x))
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert_close(y, x, w)


@pytest.mark.parametrize("t", QUANT, ids=lambda t: t.name)
def test_every_path_and_thread_count(t, monkeypatch):
    """The same product through gemv1 / gemm_s / tiles + torch.mm, on 1 and 2 threads."""
    k = k_for(t)
    n = 200
    ql, w = make(t, n, k, seed=3, wide=True)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, k), dtype=np.float32)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for path in qlm.PATHS:  # each path for every M
                monkeypatch.setitem(qlm.DISPATCH, t, ((1, path),))
                assert_close(ql.forward(torch.from_numpy(x[:1])), x[:1], w)
                assert_close(ql.forward(torch.from_numpy(x)), x, w)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("t", QUANT, ids=lambda t: t.name)
def test_each_dispatch_range(t):
    """Every (first M, path) step of the dispatch table, at both ends of its range."""
    assert set(qlm.DISPATCH) == set(QUANT)
    steps = qlm.DISPATCH[t]
    assert steps[0][0] == 1 and all(a[0] < b[0] for a, b in zip(steps, steps[1:]))
    k = k_for(t)
    ql, w = make(t, 70, k, seed=11)
    rng = np.random.default_rng(12)
    for i, (m0, path) in enumerate(steps):
        assert path in qlm.PATHS
        last = steps[i + 1][0] - 1 if i + 1 < len(steps) else m0 + 7
        for m in sorted({m0, last}):
            assert qlm.path_for(t, m) == path
            x = rng.standard_normal((m, k), dtype=np.float32)
            assert_close(ql.forward(torch.from_numpy(x)), x, w)


@pytest.mark.parametrize("t", QUANT, ids=lambda t: t.name)
def test_gemm_s_row_blocks(t):
    """gemm_s takes the rows of x in blocks of 4, then 2 or 1 (a block's missing rows repeat
    its last row and are not stored) and 16 rows of W per vector: every M from 1 to 9, 16 and
    17, on a weight whose tail group ends in a partial vector (165 rows: 2 groups + 37) and
    on a tail only; the rows after Y's last are never written."""
    k = k_for(t)
    gemm_s = kernel_cache.kernel("gemm_s", t)
    for n in (165, 37):
        ql, w = make(t, n, k, seed=30 + n, wide=True)
        rng = np.random.default_rng(31)
        for m in [*range(1, 10), 16, 17]:
            x = rng.standard_normal((m, k), dtype=np.float32)
            out = np.full((m + 4, n), np.nan, np.float32)
            gemm_s(ql._gidx, ql._P, ql._Pt, x, out[:m])
            assert_close(torch.from_numpy(out[:m]), x, w)
            assert np.isnan(out[m:]).all()


# numba compiles for the host CPU; these variables make it compile for one without AVX-512
# (16-lane vectors become pairs of 256-bit registers), as on many laptops
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,"
                                   "+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
                                   "+ssse3,+xsave"}
AVX2_PROBE = """
import sys
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from diptych.backends.torch.cpu import int8_activations, kernel_cache
from tests.backends.cpu import test_qlinear as tq
assert not int8_activations.SUPPORTED and not kernel_cache.has_kernel("gemm_i8", T.Q8_0)
for name in sys.argv[1:]:
    t = T[name]
    ql, w = tq.make(t, 165, tq.k_for(t), seed=40, wide=True)
    for m in (1, 2, 3, 5):
        x = np.random.default_rng(m).standard_normal((m, tq.k_for(t)), dtype=np.float32)
        with torch.inference_mode():  # no int8 activations without VNNI: gemm_s
            tq.assert_close(ql.forward(torch.from_numpy(x)), x, w)
print("ok")
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
def test_gemm_s_without_avx512(tmp_path):
    """gemm_s compiled for an AVX2 CPU (no 512-bit registers, no VNNI: no int8 activations;
    a cache of its own) is exact on a nibble type whose halves are written out, on Q8_0's
    loop and on a K-quant."""
    env = {**os.environ, **AVX2_ONLY, "DIPTYCH_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", AVX2_PROBE, "Q4_1", "Q8_0", "Q6_K"], env=env,
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_forward_from_another_thread():
    """numba's thread count is per thread: a generation worker thread must work too."""
    import threading

    ql, w = make(T.Q4_K, 300, 256, seed=9)
    x = np.random.default_rng(10).standard_normal((2, 256), dtype=np.float32)
    out = {}

    def work():
        out["y1"] = ql.forward(torch.from_numpy(x[:1]))
        out["y2"] = ql.forward(torch.from_numpy(x))

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert_close(out["y1"], x[:1], w)
    assert_close(out["y2"], x, w)


def test_small_tiles(monkeypatch):
    """Several tiles, the last one partial (the tile buffer is reused)."""
    monkeypatch.setattr(qlm, "TILE_BYTES", 4 * 160 * 64)  # 64 rows per tile at K=160
    monkeypatch.setitem(qlm.DISPATCH, T.Q5_1, ((1, "tiles"),))
    ql, w = make(T.Q5_1, 300, 160, seed=5)
    assert ql._rows_per_tile == 64
    x = np.random.default_rng(6).standard_normal((20, 160), dtype=np.float32)
    assert_close(ql.forward(torch.from_numpy(x)), x, w)
    assert torch.equal(ql.dequantize(), torch.from_numpy(w))


def test_input_forms():
    ql, w = make(T.Q4_1, 70, 64)
    x = np.random.default_rng(7).standard_normal((3, 128), dtype=np.float32)[:, ::2]  # strided
    assert_close(ql.forward(torch.from_numpy(x)), np.ascontiguousarray(x), w)
    y16 = ql.forward(torch.from_numpy(x).to(torch.float64))
    assert y16.dtype == torch.float32
    assert ql.forward(torch.zeros((0, 64))).shape == (0, 70)
    with pytest.raises(ValueError):
        ql.forward(torch.zeros((2, 63)))


def test_autograd_input_gradient():
    ql, w = make(T.Q8_0, 90, 96)
    x = torch.randn(4, 96, requires_grad=True)
    y = ql(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = gy.double() @ torch.from_numpy(w).double()
    assert torch.allclose(x.grad.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("t", [T.Q4_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_bf16_products_round_as_torch_bf16_products(t):
    """Within bf16_products (training's compute_dtype "bf16"), the tile path and grad_input
    multiply bf16 copies of x (grad y) and of each tile, each product rounded to bf16 once:
    equal to torch's bf16 products of the dequantized tiles (the input gradient summing
    the tiles' rounded products in fp32, as ours does), where the fp32 path is ~3e-3 away."""
    k, n = k_for(t), 200
    ql, w = make(t, n, k, seed=3)
    ql._rows_per_tile = ql._rows_per_bf16_tile = 64   # four tiles, the last partial
    x, g = torch.randn(300, k), torch.randn(300, n)   # 300 rows: DISPATCH's tile path
    wb = torch.from_numpy(w).to(torch.bfloat16)
    want_y = (x.to(torch.bfloat16) @ wb.T).float()
    want_gx = sum((g[:, r:r + 64].to(torch.bfloat16) @ wb[r:r + 64]).float()
                  for r in range(0, n, 64))

    with qlm.bf16_products():
        y, gx = ql.forward(x), ql.grad_input(g)
    assert y.dtype == gx.dtype == torch.float32
    assert relative_error(y, want_y) <= 1e-5 and relative_error(gx, want_gx) <= 1e-5
    assert relative_error(ql.forward(x), want_y) > 1e-3
    assert relative_error(ql.grad_input(g), want_gx) > 1e-3


# -- dequantize / embed_rows / memory ---------------------------------------------------------

@pytest.mark.parametrize("t", QUANT + FLOAT, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(t):
    k = k_for(t)
    for n in (165, 37):
        ql, w = make(t, n, k, seed=n + 10, wide=True)
        d = ql.dequantize()
        assert d.dtype == torch.float32 and d.shape == (n, k)
        assert np.array_equal(d.numpy().view(np.uint32), w.view(np.uint32))  # -0.0 included


@pytest.mark.parametrize("t", QUANT + FLOAT, ids=lambda t: t.name)
def test_bf16_tiles_are_torchs_bf16_of_the_exact_weights(t):
    """The bf16 tiles (dequantized straight to bf16 by deq_tb for the quantized types) hold
    bit for bit what torch's fp32 -> bf16 conversion makes of the exact weights: several
    tiles, the last one partial, over two row groups and a tail."""
    k = k_for(t)
    ql, w = make(t, 165, k, seed=21, wide=True)
    ql._rows_per_bf16_tile = 128
    want = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16)
    seen = 0
    for row0, row1, wt in ql._bf16_tiles():
        assert wt.dtype == torch.bfloat16 and wt.shape == (k, row1 - row0) and row0 == seen
        assert torch.equal(wt.T.contiguous().view(torch.int16), want[row0:row1])
        seen = row1
    assert seen == 165


def test_bf16_bits_round_as_torch():
    """llvm_bits.bf16 (deq_tb's rounding) against torch's fp32 -> bf16 on the cases that
    tell rounding rules apart: ties to even both ways, carries into the exponent, overflow
    to infinity, subnormals, signed zeros; NaN stays NaN."""
    from numba import njit

    from diptych.backends.torch.cpu.llvm_bits import bf16

    @njit
    def convert(x, out):
        for i in range(x.size):
            out[i] = bf16(x[i])

    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3FFF8000, 0x7F7FFFFF,
                     0x7F7F7FFF, 0x00000001, 0x00018000, 0x80000000, 0xBF808000, 0x7F800000,
                     0xFF800000], np.uint32)
    rng = np.random.default_rng(0)
    x = np.concatenate([bits.view(np.float32), rng.standard_normal(4096, dtype=np.float32)
                        * np.float32(1e3)])
    out = np.empty(x.size, np.uint16)
    convert(x, out)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, want)
    nan = np.full(1, np.nan, np.float32)
    convert(nan, out[:1])
    assert torch.from_numpy(out[:1].view(np.int16)).view(torch.bfloat16).isnan().all()


@pytest.mark.parametrize("table", ["linear", "embedding table"])
@pytest.mark.parametrize("t", QUANT + FLOAT, ids=lambda t: t.name)
def test_embed_rows(t, table):
    """A linear's rows (from its repacked blocks) and an EmbeddingTable's (from the file's
    blocks: an embedding the output is not tied to) are gguf-py's, bit for bit."""
    k = k_for(t)
    n = 150
    ql, w = make(t, n, k, seed=20, wide=True)
    if table == "embedding table":
        ql = EmbeddingTable(QuantTensor("w", t, (n, k), random_data(t, n, k,
                                                                    np.random.default_rng(20),
                                                                    True)))
        assert ql.nbytes == GGML_QUANT_SIZES[t][1] * n * k // GGML_QUANT_SIZES[t][0]
    ids = torch.tensor([0, 149, 64, 63, 128, 127, 5, 5, 130], dtype=torch.long)
    rows = ql.embed_rows(ids)
    assert rows.dtype == torch.float32 and rows.shape == (len(ids), k)
    assert np.array_equal(rows.numpy().view(np.uint32), w[ids.numpy()].view(np.uint32))
    assert ql.embed_rows(torch.zeros(0, dtype=torch.long)).shape == (0, k)
    for bad in (-1, n):
        with pytest.raises(IndexError):
            ql.embed_rows(torch.tensor([0, bad]))


@pytest.mark.parametrize("t", QUANT, ids=lambda t: t.name)
def test_memory_is_the_gguf_bytes(t):
    k = k_for(t)
    for n in (165, 37, 640):
        rng = np.random.default_rng(n)
        data = random_data(t, n, k, rng)
        ql = QuantLinear.from_quant_tensor(QuantTensor("w", t, (n, k), data))
        assert ql.nbytes <= 1.2 * data.nbytes
        assert ql.nbytes == data.nbytes  # no float expansion, no padding
        assert ql.quantized and ql.ggml_type == t and ql.shape == (n, k)
        assert t.name in ql.layout


def test_float_types_hold_their_dtype():
    for t, dt in ((T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)):
        ql, _ = make(t, 10, 32)
        assert not ql.quantized and ql._w.dtype == dt
        assert ql.nbytes == 10 * 32 * dt.itemsize


def test_from_memory_map(tmp_path):
    """Weights that come from a read-only memory map (how the GGUF reader hands them over)."""
    data = random_data(T.Q6_K, 70, 256, np.random.default_rng(8))
    path = tmp_path / "w.bin"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=data.shape)
    ql = QuantLinear.from_quant_tensor(QuantTensor("w", T.Q6_K, (70, 256), mm))
    assert torch.equal(ql.dequantize(), torch.from_numpy(oracle(data, T.Q6_K, 70, 256)))


def _q8_0_file(path, tensors: dict[str, np.ndarray]):
    """A GGUF file of the tensors quantized to Q8_0 by gguf-py."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for name, values in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(values, T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.skipif(not hasattr(__import__("mmap").mmap, "madvise"), reason="no madvise")
def test_repacking_a_mapped_tensor_lets_its_read_pages_go(tmp_path):
    """A weight repacked from a GGUF file never has all its mapped pages resident at once
    beside its copy: the file's pages read so far are let go after each chunk of rows, so
    with two threads copying chunks at most about two chunks' pages are resident."""
    import psutil

    from diptych.quant.gguf_file import GGUFFile

    n, k = 32768, 512                       # Q8_0: 17 MiB, eight chunks of 4096 rows
    values = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    path = _q8_0_file(tmp_path / "big.gguf", {"big.w": values})
    resident = []
    with GGUFFile(path) as f:
        qt = f.tensors["big.w"]
        assert qt.release is not None

        def release():
            resident.append(sum(m.rss for m in psutil.Process().memory_maps()
                                if m.path == str(path)))
            qt.release()

        threads = torch.get_num_threads()
        torch.set_num_threads(2)   # the chunks are copied on torch's thread count
        try:
            ql = QuantLinear.from_quant_tensor(dataclasses.replace(qt, release=release))
        finally:
            torch.set_num_threads(threads)
        expected = oracle(np.asarray(qt.data), T.Q8_0, n, k)
    assert len(resident) == 8 and max(resident) <= 3 * qt.data.nbytes // 8
    assert torch.equal(ql.dequantize(), torch.from_numpy(expected))


@pytest.mark.skipif(not hasattr(__import__("mmap").mmap, "madvise"), reason="no madvise")
def test_a_stacked_weight_from_a_file_lets_every_parts_pages_go(tmp_path):
    """A fused QKV repacked from three mapped tensors lets each part's read pages go, not
    only the first part's."""
    import psutil

    from diptych.quant.gguf_file import GGUFFile

    n, k = 4096, 512                         # Q8_0: 2.1 MiB a part
    rng = np.random.default_rng(2)
    path = _q8_0_file(tmp_path / "qkv.gguf", {f"{name}.w": rng.standard_normal((n, k)).astype(
        np.float32) for name in "qkv"})
    with GGUFFile(path) as f:
        parts = [f.tensors[f"{name}.w"] for name in "qkv"]
        ql = QuantLinear.from_parts("qkv", parts)
        resident = sum(m.rss for m in psutil.Process().memory_maps() if m.path == str(path))
        assert resident < parts[0].data.nbytes // 2
        want = np.concatenate([oracle(np.asarray(p.data), T.Q8_0, n, k) for p in parts])
    assert torch.equal(ql.dequantize(), torch.from_numpy(want))


def test_a_failed_chunk_of_a_threaded_repack_stops_the_rest():
    """The repack's chunks run on a pool: the first failure reaches the caller and the
    chunks still queued are cancelled, not copied on after load has given up."""
    from diptych.backends.torch.cpu.repack import _pool, repack

    rows = np.zeros((64 * 64, 34), np.uint8)      # 64 chunks of one 64-row group
    calls = []

    def release():   # a chunk takes 10 ms: the queue cannot drain before the failure is seen
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        time.sleep(0.01)

    with pytest.raises(KeyboardInterrupt):
        repack([rows], 34, 34, rows_per_chunk=64, release=release, threads=2)
    _pool(2).submit(lambda: None).result()   # every chunk queued before it has run or gone
    assert len(calls) < 8


@pytest.mark.parametrize("threads", [1, 2])
def test_repack_is_each_groups_rows_transposed(threads):
    """repack.py's layout, byte for byte, against numpy's transpose of the rows: row widths
    that are whole 16-byte tiles, end in a part of one, or are narrower than one; several
    chunks; stacked parts; a tail group; mapped (read-only) and writable rows."""
    from diptych.backends.torch.cpu.repack import R, repack

    rng = np.random.default_rng(5)
    for parts, row_bytes, ts in (([64], 144, 144), ([320], 210 * 6, 210), ([130], 8, 8),
                                 ([192, 64, 37], 34 * 3, 34), ([4 * 64 + 5], 360, 20)):
        blocks = [rng.integers(0, 256, (n, row_bytes), dtype=np.uint8) for n in parts]
        blocks[0].flags.writeable = False
        P, Pt = repack(blocks, row_bytes, ts, rows_per_chunk=128, threads=threads)
        rows = np.concatenate(blocks)
        g, nb = len(rows) // R, row_bytes // ts
        want = rows[:g * R].reshape(g, R, nb, ts).transpose(0, 2, 3, 1)
        assert P.shape == want.shape and np.array_equal(P, want), (parts, row_bytes)
        assert np.array_equal(Pt[0], rows[g * R:].reshape(-1, nb, ts).transpose(1, 2, 0))


def test_errors():
    with pytest.raises(ValueError):
        QuantLinear.from_quant_tensor(QuantTensor("w", T.Q4_0, (4, 48), np.zeros((4, 27), np.uint8)))
    with pytest.raises(NotImplementedError):
        QuantLinear.from_quant_tensor(QuantTensor("w", T.IQ2_XXS, (4, 256),
                                                  np.zeros((4, 66), np.uint8)))
    with pytest.raises(ValueError):
        QuantLinear.from_quant_tensor(QuantTensor("w", T.Q8_0, (2, 2, 32),
                                                  np.zeros((4, 34), np.uint8)))


@pytest.mark.parametrize("t", QUANT + FLOAT, ids=lambda t: t.name)
def test_linear_with_adapters_and_gradients(t):
    """The CPU backend's linear with LoRA pairs (one on a row range, as on a stacked matrix)
    and its gradients in x, A and B (x's through the quantized weight's tiles) against a
    dense float64 reference."""
    from diptych.backends.torch.cpu.backend import CpuBackend

    from ..adapter_reference import check_torch_backend

    n, k = 24, k_for(t)
    data = random_data(t, n, k, np.random.default_rng(3))
    check_torch_backend(CpuBackend(), QuantTensor("w", t, (n, k), data), oracle(data, t, n, k))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_stacked_parts_equal_their_stacked_copy(t):
    """A fused QKV repacked part by part is the linear of the parts' stacked rows, whether
    the parts are whole row groups (repacked in place) or not (through a stacked copy); a
    mapped part's pages are let go as it is read."""
    rng = np.random.default_rng(3)
    k = k_for(t)
    for rows in ([128, 64, 64], [128, 64, 37], [100, 64, 64]):
        parts = [QuantTensor(f"p{i}", t, (n, k), random_data(t, n, k, rng))
                 for i, n in enumerate(rows)]
        released = []
        parts[0] = dataclasses.replace(parts[0], release=lambda: released.append(1))
        ql = QuantLinear.from_parts("qkv", parts)
        ref = QuantLinear.from_quant_tensor(QuantTensor.stack_rows("qkv", parts))
        assert ql.shape == (sum(rows), k) and ql.ggml_type == t
        assert torch.equal(ql.dequantize(), ref.dequantize())
        assert released or t == T.F16 or rows[0] % 64
    with pytest.raises(ValueError, match="one type and width"):
        QuantLinear.from_parts("qkv", [parts[0], QuantTensor("w", t, (64, 2 * k),
                                                             random_data(t, 64, 2 * k, rng))])


@pytest.mark.parametrize("tied", [False, True])
def test_an_embedding_only_looked_up_stays_in_the_file(tmp_path, tied, capsys):
    """Untied, the token embedding is an EmbeddingTable over the file's own mapped bytes
    (no repacked copy), as `diptych info` says; tied to the output, it is a linear like any
    other."""
    import diptych
    from diptych.cli.main import main

    from ...tiny_models import tiny_hf_model, write_gguf

    path = write_gguf(tiny_hf_model("qwen2", seed=5, tied=tied), "qwen2",
                      tmp_path / "m.gguf", "Q8_0")
    model = diptych.load(path, backend="torch", device="cpu", n_ctx=32)
    table = model.engine.weights.tok_embd
    file_bytes = model.gguf.tensors["token_embd.weight"].data
    if tied:
        assert isinstance(table, QuantLinear) and model.engine.weights.output is table
    else:
        assert isinstance(table, EmbeddingTable) and np.shares_memory(table._data, file_bytes)
    assert model.generate("hello", max_tokens=3, temperature=0)
    assert main(["info", str(path), "--backend", "torch", "--device", "cpu"]) == 0
    said = "token_embd.weight: Q8_0 -> GGML blocks as stored, rows dequantized when read"
    assert (said in capsys.readouterr().out) is not tied
