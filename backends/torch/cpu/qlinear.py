"""QuantLinear: a GGUF weight kept quantized in memory, y = x @ W.T on the CPU.

Design (what was measured and chosen; details of the kernels in kernels.py)
------------------------------------------------------------------------------
Memory: quantized types keep exactly their GGUF bytes (nbytes == GGUF bytes), repacked once
at load, group by group, into "row-interleaved blocks": the same byte of 64 consecutive rows'
blocks is contiguous, so a kernel unpacks 16 rows per AVX-512 register and multiplies by a
broadcast activation (no horizontal sums, no shuffles). fp16 scales stay fp16 (converted in
the kernel with vcvtph2ps). Repacking SmolLM2-135M (92 MiB) takes 0.26 s, Qwen2.5-0.5B
(463 MiB) 1.2 s, with no memory beyond the repacked copy.

Paths, per call (M = rows of x):
  M = 1          numba fused GEMV ("gemv1"): integer codes x activation, fp32 accumulation,
                 scale (and the min/offset term, via per-unit sums of x) once per 16/32
                 elements. Reads every weight byte once.
  2 <= M < T     numba "gemm_s": each 32x64 unit is dequantized (exactly) into an L1-resident
                 fp32 tile that all M rows read: weight bytes read once for all M rows.
  M >= T         dequantize ~4 MB fp32 tiles of W.T (deq_t, bit-exact, reused buffer, on the
                 calling thread) and multiply with torch.mm (MKL).
  T = GEMM_MIN_M = 64 for the 32-element block types, 32 for the K-quants (from the
  crossovers measured below; at M=64, gemm_s and tiles are within 10-20% of each other).
  F32 weights: torch.mm. F16/BF16: converted to fp32 in row tiles, then torch.mm.
Exactness: activations stay fp32 (never quantized to 8 bits as llama.cpp does); outputs are
within a few fp32 ulps of x @ dequant(W).T (test bound (8 + K/16) eps32 * sum|x||w|, observed
<= 4e-7 relative); dequantize() and embed_rows() are bit-exact with gguf.quants.dequantize.

Measured (2026-11-23, this project's CPU box: 2-core AMD EPYC (Zen 4, AVX-512), 32 MB L3,
Python 3.11, torch 2.13 CPU, numba 0.68; benchmarks/bench_qlinear.py, random blocks, best
of several runs taken while the shared machine was otherwise idle: single runs vary +-30%).
GB/s = GGUF weight bytes / time (the effective bandwidth at M = 1), GF = GFLOP/s (2MNK/t),
"x" = speed-up over torch on the same weight dequantized to fp32 (x @ W.T, MKL).

  M=1 (decode), 2 threads: GB/s  GF  x-vs-fp32
  type         1536x576        576x1536       49152x576       4864x896        896x4864      151936x896
  Q4_0      10.9  39 1.4x   9.5  34 1.6x  12.3  44 7.5x  16.4  58 2.8x  12.5  45 1.8x  11.2  40 6.1x
  Q4_1      11.1  36 1.6x  10.5  34 1.5x  18.1  58 9.9x  12.8  41 3.4x  13.4  43 2.0x  12.3  39 6.5x
  Q5_0       8.8  26 0.9x   9.9  29 0.9x   9.4  27 5.4x   9.7  28 1.8x   9.8  29 1.6x  11.8  34 4.8x
  Q5_1       9.5  25 1.3x  12.5  33 1.2x  14.7  39 6.4x  10.8  29 1.3x  11.1  30 1.0x   9.9  26 4.1x
  Q8_0      20.2  38 1.4x  19.1  36 1.3x  22.6  43 7.3x  23.9  45 3.6x  25.3  48 2.2x  16.6  31 4.6x
  IQ4_NL     5.8  21 0.8x   6.7  24 0.8x   6.0  21 4.0x   6.4  23 0.9x   8.1  29 1.1x   5.9  21 3.4x
  Q2_K         -            5.7  35 1.1x     -              -            7.3  44 1.7x     -
  Q3_K         -            5.0  23 0.8x     -              -            5.8  27 1.2x     -
  Q4_K         -            9.6  34 1.1x     -              -            9.4  33 1.5x     -
  Q5_K         -            7.3  21 1.0x     -              -           10.1  29 1.1x     -
  Q6_K         -           10.0  24 0.8x     -              -           10.2  25 0.9x     -
  F16       10.7  11 0.4x  11.3  11 0.4x   9.9  10 1.7x  (noisy)       17.0  17 0.6x  12.8  13 2.2x
  BF16       8.1   8 0.3x  11.5  12 0.5x  11.5  11 2.0x  10.3  10 0.6x  12.4  12 0.5x  11.9  12 1.8x
  F32       51.1  26 1.0x  39.2  20 0.7x  11.4   6 1.0x  28.8  14 1.1x  37.9  19 1.1x  14.1   7 1.0x
  (K-quants need K % 256 == 0: 576 and 896 rows are stored by llama.cpp in a fallback type.)
  The small shapes' fp32 weights (3.5 MB) stay in L3 across repetitions, which flatters the
  fp32 column there; in a model the fp32 weights stream from DRAM like the large shapes.

  M=256 (prefill chunk), 2 threads: GF  x-vs-fp32 (tiles + torch.mm for every quantized type)
  Q4_0  153 0.82x | 94 0.56x | 98 0.99x | 153 1.25x | 101 0.61x | 119 1.12x   (same columns)
  Q4_1  130 0.71x |132 0.77x | 76 0.78x | 121 0.91x | 126 0.83x |  79 0.71x
  Q5_0  149 0.87x | 94 0.58x |112 1.03x |  87 0.70x |  94 0.61x |  95 0.90x
  Q8_0  131 0.73x |158 0.80x | 79 0.82x | 111 0.74x | 133 0.94x |  88 0.82x
  Q4_K    -       |152 0.87x |   -      |    -      | 151 0.86x |    -
  Q6_K    -       | 86 0.53x |   -      |    -      |  97 0.62x |    -
  (other types alike: 80-160 GF, 0.55-1.1x of fp32 MKL on the already-dequantized weight;
  the tile dequantization itself is 3-10% of the time, the rest is MKL on 4 MB tiles.)

  SmolLM2-135M decode step, the 211 linears (30 layers x q,k,v,o,gate,up,down in Q4_1 + the
  Q8_0 tied head, 92 MiB; bench_qlinear.py --smollm2): 2 threads 8.2-9.9 ms = 100-122 tok/s
  upper bound, 10-12 GB/s effective; 1 thread 10.6 ms (94 tok/s, 9 GB/s). llama.cpp decodes
  the whole model at ~100 tok/s here. The 28.7 MiB head alone: 1.1-1.8 ms (16-27 GB/s).
  Prefill of 256 tokens, layer linears: 410-630 ms (400-620 tok/s) on 2 threads.

What limits M = 1: instruction throughput of the unpacking, not DRAM. One core runs ~4-5
weights/cycle (Q4_1: zero-extend, and/shift, int->float, FMA per weight; 512-bit ops are
double-pumped on Zen 4), i.e. ~9 GB/s of Q4_1 per core; two cores ~11-13 GB/s (Q8_0, fewer
ops per byte: 17-25 GB/s, near the ~20-25 GB/s this VM streams from DRAM). Then the fixed
cost per call: ~5.5 us of Python/torch/numpy/gufunc dispatch (211 calls = 1.2 ms per SmolLM2
token) and 2-thread imbalance on 3-9-group matrices (k/v are 192 rows = 3 groups).
Rejected (measured): torch's _weight_int4pack_mm_for_cpu accepts fp32 x and fp32
scale/zero (w = (q-8)*scale + zero; exact to 1e-6 relative) but runs at ~1 GFLOP/s here,
30-40x slower; per-row dot products with a horizontal sum per block (4x slower than
vectorizing across rows); numba prange instead of gufuncs (2-3x the compile time); relying
on LLVM to unroll the 16/32-element loops (it does not for the heavier decoders: 5-12x
slower) or on numba inlining (20-50 s compiles) - hence the generated kernel source.

Threads: numba runs the kernels on its own OpenMP pool (a second libgomp next to torch's).
Numba's thread count is per calling thread; every call sets it to torch.get_num_threads().
Two pools must not hand the cores back and forth in large parallel regions (their idle
workers spin for milliseconds): the tile path therefore dequantizes on the calling thread
only and leaves the cores to MKL. Decode interleaves numba kernels with small torch ops that
torch runs single-threaded, which is fine. Beware: on a machine where other processes keep
the cores busy, every 2-thread fork-join can wait a scheduler slice (measured 4-8 ms per
call instead of 50 us); one thread (DIPTYCH_THREADS=1, set before the first call: libgomp
keeps its team) then runs at ~9 GB/s and does not stall.
Compile: numba compiles 4 kernels per type on first use (~5-8 s per type, 1 min for all 11;
kernels.precompile() does it in parallel processes) and caches them on disk under
diptych's cache folder (kernels/); loading a cached type costs ~0.2-0.6 s per kernel.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from diptych.quant import QuantTensor

from . import kernels as ck

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
QUANT_TYPES = tuple(QT(t) for t in ck.TYPE_INFO)

# Rows of x from which the quantized path switches from the numba kernels (each weight byte
# read once for all rows) to "dequantize a tile of weight rows into a reused fp32 buffer, then
# torch.mm" (MKL), per type. Chosen from the measurements above.
GEMM_MIN_M = {t: (32 if ck.TYPE_INFO[int(t)][0] == 256 else 64) for t in QUANT_TYPES}
# fp32 bytes of one dequantized tile on the torch.mm path (stays in the 32 MB L3)
TILE_BYTES = 4 << 20
# numba threads dequantizing tiles for torch.mm (0: torch's thread count)
TILE_DEQ_THREADS = 1


_tls = threading.local()


def _sync_threads() -> None:
    """numba's thread count is per calling thread (a generation worker thread starts at
    numba's default): follow torch's intra-op count, checked cheaply on every call."""
    n = torch.get_num_threads()
    if getattr(_tls, "n", 0) != n:
        ck.set_num_threads(n)
        _tls.n = n


class QuantLinear:
    """A linear weight W (out_features N, in_features K) in a GGML type, ready for the CPU.

    Build with `QuantLinear.from_quant_tensor(qt)`. Quantized types are repacked once into
    row-interleaved blocks (the GGUF bytes, transposed so that 64 rows' copies of each block
    byte are adjacent; see kernels.py) and never expanded to float as a whole. F32 is held as
    a float32 tensor, F16/BF16 in their own dtype.

    forward(x): (M, K) float32 -> (M, N) float32 with fp32 accumulation; activations are never
    quantized. Differentiable in x (grad_x = grad_y @ W); the weight is frozen.
    """

    def __init__(self, name: str, ggml_type: QT, shape: tuple[int, int], *,
                 packed: tuple[np.ndarray, np.ndarray] | None = None,
                 weight: torch.Tensor | None = None):
        self.name = name
        self.ggml_type = QT(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        self._P, self._Pt = packed if packed is not None else (None, None)
        self._w = weight
        self._gidx = (np.arange(ck._groups(self._P, self._Pt), dtype=np.int64)
                      if packed is not None else None)
        self._gemv1 = None  # the decode kernel, looked up once
        n, k = self.shape
        rows = max(ck.R, (TILE_BYTES // (4 * max(k, 1))) // ck.R * ck.R)
        self._rows_per_tile = min(rows, -(-n // ck.R) * ck.R)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_quant_tensor(cls, qt: QuantTensor) -> "QuantLinear":
        if len(qt.shape) != 2:
            raise ValueError(f"{qt.name}: a linear weight must be 2-D, got shape {qt.shape}")
        t = QT(qt.ggml_type)
        n, k = (int(s) for s in qt.shape)
        if t in FLOAT_TYPES:
            raw = np.asarray(qt.data).reshape(n, -1)
            if t == QT.F32:
                w = torch.from_numpy(raw.view(np.float32).reshape(n, k).copy())
            elif t == QT.F16:
                w = torch.from_numpy(raw.view(np.float16).reshape(n, k).copy())
            else:
                w = torch.from_numpy(raw.view(np.int16).reshape(n, k).copy()).view(torch.bfloat16)
            return cls(qt.name, t, (n, k), weight=w)
        if int(t) not in ck.TYPE_INFO:
            raise NotImplementedError(
                f"{qt.name}: no CPU kernel for {t.name}; supported: "
                + ", ".join(x.name for x in FLOAT_TYPES + QUANT_TYPES))
        bs, ts = GGML_QUANT_SIZES[t]
        if k % bs:
            raise ValueError(f"{qt.name}: {t.name} rows need a multiple of {bs} columns, got {k}")
        row_bytes = k // bs * ts
        data = qt.data
        if data.shape != (n, row_bytes):
            data = np.asarray(data).reshape(n, row_bytes)
        return cls(qt.name, t, (n, k), packed=ck.repack(data, n, row_bytes, ts))

    # -- description ----------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self._P is not None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of weight memory held (for quantized types: exactly the GGUF data size)."""
        if self.quantized:
            return int(self._P.nbytes + self._Pt.nbytes)
        return self._w.numel() * self._w.element_size()

    @property
    def layout(self) -> str:
        t = self.ggml_type.name
        if self.ggml_type == QT.F32:
            return "F32 -> fp32 tensor, torch.mm"
        if not self.quantized:
            return f"{t} -> {t.lower()} tensor, fp32 tiles + torch.mm"
        gm = GEMM_MIN_M[self.ggml_type]
        return (f"{t} -> GGML blocks interleaved by {ck.R} rows (fp16 scales kept), numba fused "
                f"GEMV (M=1) / L1 dequant-GEMM (M<{gm}), fp32 tiles + torch.mm (M>={gm})")

    def __repr__(self) -> str:
        return (f"QuantLinear({self.name!r}, {self.ggml_type.name}, shape={self.shape}, "
                f"{self.nbytes / 2**20:.2f} MiB)")

    # -- compute --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for x (M, K) -> (M, N) float32, with fp32 accumulation."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"{self.name}: expected x of shape (M, {self.shape[1]}), "
                             f"got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            return _QuantLinearFn.apply(x, self)
        return self._forward(x)

    __call__ = forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        xn = x.detach().numpy() if x.requires_grad else x.numpy()
        if not xn.flags.c_contiguous:
            xn = np.ascontiguousarray(xn)
        m = xn.shape[0]
        if self.ggml_type == QT.F32:
            return torch.from_numpy(xn) @ self._w.T
        if m == 0:
            return torch.empty((0, self.shape[0]), dtype=torch.float32)
        if not self.quantized or m >= GEMM_MIN_M[self.ggml_type]:
            return self._tiled(torch.from_numpy(xn))
        _sync_threads()
        y = np.empty((m, self.shape[0]), np.float32)
        if m == 1:
            if self._gemv1 is None:
                self._gemv1 = ck.kernel("gemv1", self.ggml_type)
            self._gemv1(self._gidx, self._P, self._Pt, xn[0], y[0])
        else:
            ck.kernel("gemm_s", self.ggml_type)(self._gidx, self._P, self._Pt, xn, y)
        return torch.from_numpy(y)

    def _tiles(self):
        """Yield (row0, row1, fp32 tensor (K, row1-row0) = W[row0:row1].T), one reused buffer.

        numba dequantizes on the calling thread only (TILE_DEQ_THREADS): the consumer of the
        tiles is torch's BLAS on torch's OpenMP pool, and handing the cores back and forth
        between torch's and numba's pools costs about a millisecond per switch on 2 cores
        (their idle workers spin), more than the dequantization itself."""
        n, k = self.shape
        step = self._rows_per_tile
        if not self.quantized:  # F16/BF16: convert row tiles (contiguous), hand out their .T
            buf = torch.empty((step, k), dtype=torch.float32)
            for row0 in range(0, n, step):
                row1 = min(n, row0 + step)
                tile = buf[:row1 - row0]
                tile.copy_(self._w[row0:row1])
                yield row0, row1, tile.T
            return
        buf = np.empty((k, step), np.float32)
        tbuf = torch.from_numpy(buf)
        prev = ck.get_num_threads()
        ck.set_num_threads(TILE_DEQ_THREADS or torch.get_num_threads())
        try:
            for row0 in range(0, n, step):
                row1 = min(n, row0 + step)
                ck.deq_t(self.ggml_type, self._P, self._Pt, row0 // ck.R, -(-row1 // ck.R), buf)
                yield row0, row1, tbuf[:, :row1 - row0]
        finally:
            ck.set_num_threads(prev)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        y = torch.empty((m, self.shape[0]), dtype=torch.float32)
        tmp = torch.empty((m, self._rows_per_tile), dtype=torch.float32)
        for row0, row1, wt in self._tiles():
            out = tmp[:, :row1 - row0]
            torch.mm(x, wt, out=out)
            y[:, row0:row1] = out
        return y

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y (M, N) @ W (N, K) -> (M, K), tile by tile (never the whole W in fp32)."""
        grad_y = grad_y.detach().to(torch.float32).contiguous()
        if self.ggml_type == QT.F32:
            return grad_y @ self._w
        gx = torch.zeros((grad_y.shape[0], self.shape[1]), dtype=torch.float32)
        for row0, row1, wt in self._tiles():
            gx.addmm_(grad_y[:, row0:row1], wt.T)
        return gx

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 (N, K), bit-exact with gguf.quants.dequantize."""
        if not self.quantized:
            return self._w.to(torch.float32, copy=True)
        out = torch.empty(self.shape, dtype=torch.float32)
        for row0, row1, wt in self._tiles():
            out[row0:row1] = wt.T
        return out

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows W[ids] as float32 (len(ids), K); only those rows are dequantized."""
        ids_np = np.ascontiguousarray(torch.as_tensor(ids).reshape(-1).cpu().numpy(),
                                      dtype=np.int64)
        n, k = self.shape
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= n):
            bad = ids_np[(ids_np < 0) | (ids_np >= n)][0]
            raise IndexError(f"{self.name}: row {int(bad)} out of range for {n} rows")
        if not self.quantized:
            return self._w[torch.from_numpy(ids_np)].to(torch.float32)
        out = np.empty((ids_np.size, k), np.float32)
        if ids_np.size:
            _sync_threads()
            ck.deq_rows(self.ggml_type, self._P, self._Pt, ids_np, out)
        return torch.from_numpy(out)


class _QuantLinearFn(torch.autograd.Function):
    """Differentiable in x only (the base weight is frozen): grad_x = grad_y @ W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._forward(x)

    @staticmethod
    def backward(ctx, grad_y):
        return ctx.layer.grad_input(grad_y), None
