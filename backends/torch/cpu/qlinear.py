"""QuantLinear: a GGUF weight kept quantized in memory, y = x @ W.T on the CPU.

Memory: quantized types keep exactly their GGUF bytes (nbytes == GGUF bytes), repacked once
at load, group by group, into "row-interleaved blocks" (repack.py): the same byte of 64
consecutive rows' blocks is contiguous, so a kernel unpacks 16 rows per AVX-512 register
and multiplies by a broadcast activation (no horizontal sums, no shuffles). fp16 scales
stay fp16 (converted in the kernel with vcvtph2ps).

Paths (M = rows of x; kernels in kernel_source.py), chosen per (type, M) by DISPATCH:
  "gemv1"        numba fused GEMV, once per row of x: integer codes x activation, fp32
                 accumulation, scale (and the min/offset term, via per-unit sums of x) once
                 per 16/32 elements. Reads every weight byte once per row.
  "gemm_s"       16 rows of W per vector register: each weight decoded exactly once per
                 block of up to 4 rows of x and multiplied into accumulators held in
                 registers (blocks of 4, then 2 or 1). At M = 1 it is a GEMV on the exact
                 weights, faster than gemv1 for every type but IQ4_NL (BENCHMARKS.md).
  "tiles"        dequantize ~4 MB fp32 tiles of W.T (deq_t, bit-exact, reused buffer) and
                 multiply with torch.mm (MKL).
  "gemm_i8"      for weights prepared for numerics "fast" (`int8`, CpuBackend.prepare, on
                 CPUs with AVX-512 VNNI), in inference steps: x as int8 codes per 32 values
                 (int8_activations.py), integer dot products against the weights' codes,
                 scaled per unit (kernel_source.py, _I8_CODE).
  "tiles_bf16"   the same weights and steps, from _I8_BF16_TILES_FROM rows on CPUs with
                 AMX (AMX_BF16): a bf16 copy of x times ~8 MB bf16 tiles
                 dequantized straight to bf16 (deq_tb; torch.mm on oneDNN), each product
                 rounded to bf16. Every width of an inference step thus rounds x to 8
                 significant bits.
  F32 weights: torch.mm. F16/BF16: converted to fp32 in row tiles, then torch.mm.
  Within `bf16_products()` (training with compute_dtype "bf16"), the tile path and the input
  gradient multiply bf16 copies of x (or grad y) by the bf16 tiles, accumulating in fp32,
  and round each product to bf16 before it lands in the fp32 output: oneDNN's bf16 GEMM
  runs several times faster than fp32 sgemm on AMX (AVX-512 BF16 alone: BENCHMARKS.md).
Exactness: outside gemm_i8 activations stay fp32 and outputs are within a few fp32 ulps of
x @ dequant(W).T (test bound (8 + K/16) eps32 * sum|x||w|); gemm_i8 is within the same bound
of x8 @ dequant(W).T, x8 the 8-bit rounding of x (llama.cpp's way, the error that of
rounding x), and gives each row of x the same output whatever M; dequantize() and
embed_rows() are bit-exact with gguf.quants.dequantize.

Threads: numba runs the kernels on its own OpenMP pool (a second libgomp next to torch's).
Numba's thread count is per calling thread; every call sets it to torch.get_num_threads(),
or to one while threads.GOVERNOR sees the cores contended. Idle workers spin briefly, then
sleep (threads.bounded_spin); the tile paths' dequantizing takes the same threads, in turn
with torch's pool.
Compile: numba compiles each kernel a type uses on first use and caches them on disk
(kernel_cache.py; kernel_cache.precompile() compiles them in parallel processes).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from diptych.quant import QuantTensor
from diptych.quant.formats import FLOAT_TYPES, FORMATS
from diptych.sources import prepared_cache

from ..grad_ops import records
from . import int8_activations, step_tape
from .kernel_cache import kernel
from .kernel_source import KERNEL_TYPES as QUANT_TYPES
from .repack import R, n_groups, repack
from .switches import switched_on
from .threads import sync_numba_threads

# The path for M rows of x, per type: (first M, path) steps in increasing M; the last step
# at or below M applies. The fastest path on the real models' FFN shapes, one thread, by the
# calling thread's CPU time (`python benchmarks/bench_qlinear.py --crossover --threads 1`,
# M = 1..256, BENCHMARKS.md "Kernel per (type, rows of x)").
_GEMM_S_TO_TILES = {m: ((1, "gemm_s"), (m, "tiles")) for m in (24, 32, 48, 96, 128, 192, 256)}
DISPATCH: dict[QT, tuple[tuple[int, str], ...]] = {
    QT.Q4_0: _GEMM_S_TO_TILES[96], QT.Q4_1: _GEMM_S_TO_TILES[128],
    QT.Q5_0: _GEMM_S_TO_TILES[48], QT.Q5_1: _GEMM_S_TO_TILES[48],
    QT.Q8_0: _GEMM_S_TO_TILES[256],  # gemm_s was the faster up to the largest M measured
    QT.Q2_K: _GEMM_S_TO_TILES[192], QT.Q4_K: _GEMM_S_TO_TILES[192],
    # Q5_K and Q6_K: from 32 rows since gemm_s decodes the units that share bytes together
    QT.Q3_K: _GEMM_S_TO_TILES[24], QT.Q5_K: _GEMM_S_TO_TILES[32], QT.Q6_K: _GEMM_S_TO_TILES[32],
    # IQ4_NL decodes through a polynomial per weight, which both kernels evaluate once per
    # weight at one row: there gemv1's integer-code dot was the cheaper by a few percent
    QT.IQ4_NL: ((1, "gemv1"), (2, "gemm_s"), (16, "tiles")),
}
PATHS = ("gemv1", "gemm_s", "tiles")
# the paths whose place numerics "fast" gives gemm_i8 or tiles_bf16 (QuantLinear._path)
_ROUNDED_X = ("gemm_s", "tiles")
# Numerics "fast" on a CPU with AMX: the rows of x from which bf16 tiles (AMX's tile
# products, through oneDNN) outrun gemm_i8 (`python benchmarks/bench_qlinear.py --crossover
# --int8 --threads 2`, BENCHMARKS.md). Elsewhere every width takes gemm_i8: fp32 tiles never
# caught up with it to 384 rows on any type, nor did bf16 tiles on AVX-512 BF16's dot
# products (oneDNN kept off AMX), which multiply half as many pairs per instruction as
# gemm_i8's VNNI dot products.
_I8_BF16_TILES_FROM = {QT.Q4_0: 64, QT.Q4_1: 64, QT.Q5_0: 48, QT.Q5_1: 64, QT.Q8_0: 48,
                       QT.Q2_K: 48, QT.Q3_K: 48, QT.Q4_K: 64, QT.Q5_K: 48, QT.Q6_K: 48}


def path_for(ggml_type: QT, m: int) -> str:
    """The path DISPATCH chooses for m >= 1 rows of x on a quantized type."""
    steps = DISPATCH[ggml_type]
    i = len(steps) - 1
    while steps[i][0] > m:
        i -= 1
    return steps[i][1]
# Bytes of one dequantized tile of W.T on the torch.mm paths: fp32 tiles, and bf16 tiles
# (which oneDNN multiplies fast enough that fewer, larger calls pay: 8 MB against 2 and 32
# MB ones, BENCHMARKS.md)
TILE_BYTES = 4 << 20
BF16_TILE_BYTES = 8 << 20

# per thread: whether the tile path multiplies in bf16 (`bf16_products`); autograd runs a
# CPU backward pass on the thread that called backward(), so a training step sees its own
_products = threading.local()


@contextmanager
def bf16_products():
    """Within: the tile path and grad_input multiply in bf16 on this thread (training's
    compute_dtype "bf16"; the numba kernels of small M and F32 weights stay fp32)."""
    before = getattr(_products, "bf16", False)
    _products.bf16 = True
    try:
        yield
    finally:
        _products.bf16 = before


def _bf16() -> bool:
    return getattr(_products, "bf16", False)


def _host_has(*features: str) -> bool:
    from llvmlite import binding

    host = binding.get_host_cpu_features()
    return any(host.get(f) for f in features)


#: Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16), where oneDNN's bf16
#: GEMM outruns fp32 sgemm; DIPTYCH_CPU_BF16=0 says it does not (training's "auto" then
#: keeps fp32 products, and numerics "fast" no bf16 tiles).
BF16_NATIVE = _host_has("amx-bf16", "avx512bf16") and switched_on("DIPTYCH_CPU_BF16")
#: Whether it has AMX's bf16 tile products: numerics "fast" then multiplies its wide steps
#: in bf16 tiles (_I8_BF16_TILES_FROM).
AMX_BF16 = BF16_NATIVE and _host_has("amx-bf16")


class QuantLinear:
    """A linear weight W (out_features N, in_features K) in a GGML type, ready for the CPU.

    Build with `QuantLinear.from_quant_tensor(qt)`. Quantized types are repacked once into
    row-interleaved blocks (the GGUF bytes, transposed so that 64 rows' copies of each block
    byte are adjacent; see repack.py) and never expanded to float as a whole. F32 is held as
    a float32 tensor, F16/BF16 in their own dtype.

    forward(x): (M, K) float32 -> (M, N) float32; activations are quantized to int8 only by
    gemm_i8 (inference steps, see the module docstring). Differentiable in x
    (grad_x = grad_y @ W); the weight is frozen.
    """

    def __init__(self, name: str, ggml_type: QT, shape: tuple[int, int], *,
                 packed: tuple[np.ndarray, np.ndarray] | None = None,
                 weight: torch.Tensor | None = None):
        self.name = name
        self.ggml_type = QT(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        self._P, self._Pt = packed if packed is not None else (None, None)
        self._w = weight
        self._gidx = (np.arange(n_groups(self._P, self._Pt), dtype=np.int64)
                      if packed is not None else None)
        self._kernels: dict[str, object] = {}  # path -> its kernel, looked up once
        self._small_paths: dict[tuple[int, bool, bool], str | None] = {}  # small_rows' paths
        # gemm_i8 in inference steps: set for numerics "fast" (CpuBackend.prepare)
        self.int8 = False
        self._rows_per_tile = self._tile_rows(TILE_BYTES // 4)
        self._rows_per_bf16_tile = self._tile_rows(BF16_TILE_BYTES // 2)

    def _tile_rows(self, weights: int) -> int:
        """Rows of W in a tile of about `weights` values: whole row groups, at most all."""
        n, k = self.shape
        return min(max(R, weights // max(k, 1) // R * R), -(-n // R) * R)

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
        return cls._from_blocks(qt.name, [qt])

    @classmethod
    def from_parts(cls, name: str, parts: list[QuantTensor]) -> "QuantLinear":
        """2-D weights of one type and width stacked by rows (a fused QKV) as one linear,
        repacked from each part's own blocks (no stacked copy of them first) when every part
        but the last is a whole number of row groups."""
        if QT(parts[0].ggml_type) in FLOAT_TYPES or any(p.shape[0] % R for p in parts[:-1]):
            return cls.from_quant_tensor(QuantTensor.stack_rows(name, parts))
        return cls._from_blocks(name, parts)

    @classmethod
    def _from_blocks(cls, name: str, parts: list[QuantTensor]) -> "QuantLinear":
        n, k = QuantTensor.stacked_shape(name, parts)
        t = QT(parts[0].ggml_type)
        if t not in QUANT_TYPES:
            raise NotImplementedError(
                f"{name}: no CPU kernel for {t.name}; supported: "
                + ", ".join(x.name for x in FLOAT_TYPES + QUANT_TYPES))
        fmt = FORMATS[t]
        if k % fmt.block_size:
            raise ValueError(f"{name}: {t.name} rows need a multiple of {fmt.block_size} "
                             f"columns, got {k}")
        row_bytes = fmt.row_bytes(k)
        blocks = [np.asarray(p.data).reshape(p.shape[0], row_bytes) for p in parts]
        releases = [p.release for p in parts if p.release is not None]

        def release():   # every part's mapped pages (each part's release covers its bytes)
            for r in releases:
                r()

        return cls(name, t, (n, k), packed=prepared_cache.kept(
            name, t.name, (n, k), blocks,
            lambda: repack(blocks, row_bytes, fmt.type_size, release=release,
                           threads=torch.get_num_threads())))

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
        steps = ", ".join(f"{p} (M>={m0})" for m0, p in DISPATCH[self.ggml_type])
        return f"{t} -> GGML blocks interleaved by {R} rows (fp16 scales kept): {steps}"

    def __repr__(self) -> str:
        return (f"QuantLinear({self.name!r}, {self.ggml_type.name}, shape={self.shape}, "
                f"{self.nbytes / 2**20:.2f} MiB)")

    # -- compute --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for x (M, K) -> (M, N) float32, with fp32 accumulation."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"{self.name}: expected x of shape (M, {self.shape[1]}), "
                             f"got {tuple(x.shape)}")
        if records(x):
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
        if not self.quantized:
            return self._tiled(torch.from_numpy(xn))
        return self._run(self._path(m), xn)

    def _run(self, path: str, xn: np.ndarray) -> torch.Tensor:
        """y = xn @ W.T through one of PATHS (xn: C-contiguous float32, at least one row)."""
        if path == "tiles":
            return self._tiled(torch.from_numpy(xn))
        if path == "tiles_bf16":
            return self._tiled(torch.from_numpy(xn), bf16=True)
        return torch.from_numpy(self._kernel_rows(path, xn))

    def small_rows(self, xn: np.ndarray) -> np.ndarray | None:
        """y = xn @ W.T as a numpy array for a few rows of x (C-contiguous float32) when
        DISPATCH gives them a numba kernel, else None: the decode path, which skips
        `forward`'s checks and tensor conversions (the path for each width is looked up
        once: at a decode step's hundred launches, the lookups cost as much as a small
        kernel)."""
        key = (xn.shape[0], torch.is_inference_mode_enabled(), self.int8)
        path = self._small_paths.get(key, False)
        if path is False:
            path = None if self._P is None else self._path(key[0])
            if path is not None and path.startswith("tiles"):
                path = None
            self._small_paths[key] = path
        return None if path is None else self._kernel_rows(path, xn)

    def _path(self, m: int) -> str:
        """DISPATCH's path for m rows of x. In inference steps where the CPU has gemm_i8,
        every width rounds x to 8 bits: gemm_i8 takes the place of gemm_s and of the fp32
        tiles, and with AMX the steps from _I8_BF16_TILES_FROM rows multiply a bf16 copy
        of x by bf16 tiles ("tiles_bf16"; training keeps fp32 in all its passes)."""
        path = path_for(self.ggml_type, m)
        if self.int8 and torch.is_inference_mode_enabled() and path in _ROUNDED_X:
            start = _I8_BF16_TILES_FROM.get(self.ggml_type) if AMX_BF16 else None
            return "tiles_bf16" if start is not None and m >= start else "gemm_i8"
        return path

    def _kernel_rows(self, path: str, xn: np.ndarray) -> np.ndarray:
        sync_numba_threads(torch.get_num_threads())
        y = np.empty((xn.shape[0], self.shape[0]), np.float32)
        run = self._kernels.get(path)
        if run is None:
            run = self._kernels[path] = kernel(path, self.ggml_type)
        if path == "gemv1":
            for i in range(xn.shape[0]):
                step_tape.run(run, self._gidx, self._P, self._Pt, xn[i], y[i],
                              reads=(xn[i],), writes=(y[i],))
        elif path == "gemm_i8":
            q, d, s = int8_activations.quantize_rows(xn)
            step_tape.run(run, self._gidx, self._P, self._Pt, q.view(np.int32), d, s, y,
                          reads=(q, d, s), writes=(y,))
        else:
            step_tape.run(run, self._gidx, self._P, self._Pt, xn, y, reads=(xn,), writes=(y,))
        return y

    def _tiles(self):
        """Yield (row0, row1, fp32 tensor (K, row1-row0) = W[row0:row1].T), one reused buffer.

        numba dequantizes each tile on as many threads as torch then multiplies it on (the
        two pools take turns; their idle workers spin only briefly: threads.bounded_spin)."""
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
        yield from self._deq_tiles("deq_t", np.float32, step)

    def _deq_tiles(self, kind: str, dtype, step: int):
        """Tiles of W.T (K, up to `step` rows) from numba's `kind` (deq_t: fp32, deq_tb:
        bfloat16 bits) in one reused buffer, as torch tensors."""
        n, k = self.shape
        buf = np.empty((k, step), dtype)
        tbuf = torch.from_numpy(buf)
        if dtype == np.uint16:
            tbuf = tbuf.view(torch.bfloat16)
        deq = kernel(kind, self.ggml_type)
        for row0 in range(0, n, step):
            row1 = min(n, row0 + step)
            g0 = row0 // R  # buf[:, :row1 - row0] = W[row0:row1].T
            sync_numba_threads(torch.get_num_threads())
            deq(np.arange(g0, -(-row1 // R), dtype=np.int64), g0, self._P, self._Pt, buf)
            yield row0, row1, tbuf[:, :row1 - row0]

    def _tiled(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        y = torch.empty((x.shape[0], self.shape[0]), dtype=torch.float32)
        if bf16 or _bf16():
            xb = x.to(torch.bfloat16)
            for row0, row1, wt in self._bf16_tiles():
                y[:, row0:row1] = torch.mm(xb, wt)
            return y
        for row0, row1, wt in self._tiles():
            torch.mm(x, wt, out=y[:, row0:row1])  # BLAS writes the columns in place
        return y

    def _bf16_tiles(self):
        """Tiles of W.T in bfloat16 (each value rounded as torch rounds fp32 to bf16):
        dequantized straight to bf16 (deq_tb), for F16/BF16 weights `_tiles` copied."""
        if self.quantized:
            yield from self._deq_tiles("deq_tb", np.uint16, self._rows_per_bf16_tile)
            return
        buf = None
        for row0, row1, wt in self._tiles():
            if buf is None:
                buf = torch.empty(wt.shape, dtype=torch.bfloat16)
            tile = buf[:, :row1 - row0]
            tile.copy_(wt)
            yield row0, row1, tile

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y (M, N) @ W (N, K) -> (M, K), tile by tile (never the whole W in fp32)."""
        grad_y = grad_y.detach().to(torch.float32)
        if self.ggml_type == QT.F32:
            return grad_y @ self._w
        if _bf16():  # grad_y's columns converted a tile at a time: no whole bf16 copy
            gx = None
            for row0, row1, wt in self._bf16_tiles():
                part = torch.mm(grad_y[:, row0:row1].to(torch.bfloat16), wt.T)
                gx = part.to(torch.float32) if gx is None else gx.add_(part)
            return gx
        gx = torch.empty((grad_y.shape[0], self.shape[1]), dtype=torch.float32)
        for row0, row1, wt in self._tiles():
            if row0 == 0:
                torch.mm(grad_y[:, :row1], wt.T, out=gx)
            else:
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
        if not self.quantized:
            ids_np = row_ids(ids)
            check_rows(self.name, ids_np, self.shape[0])
            return self._w[torch.from_numpy(ids_np)].to(torch.float32)
        return taped_rows(ids, self.shape[1], self._deq_rows)

    def _deq_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out = W[ids] (the check is part of a taped step's call: its ids change)."""
        check_rows(self.name, ids, self.shape[0])
        sync_numba_threads(torch.get_num_threads())
        kernel("deq_rows", self.ggml_type)(np.arange(ids.size, dtype=np.int64), ids,
                                           self._P, self._Pt, out)


def row_ids(ids: torch.Tensor) -> np.ndarray:
    """Token ids as a flat int64 numpy array."""
    return np.ascontiguousarray(torch.as_tensor(ids).reshape(-1).cpu().numpy(), dtype=np.int64)


def taped_rows(ids: torch.Tensor, k: int, fill) -> torch.Tensor:
    """Rows of a table as float32 (len(ids), k), written by `fill(ids, out)` as a taped call
    (a replayed decode step fills them again for its own ids)."""
    ids_np = row_ids(ids)
    out = np.empty((ids_np.size, k), np.float32)
    if ids_np.size:
        step_tape.run(fill, ids_np, out, reads=(ids_np,), writes=(out,))
    return torch.from_numpy(out)


def check_rows(name: str, ids: np.ndarray, n: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = ids[(ids < 0) | (ids >= n)][0]
        raise IndexError(f"{name}: row {int(bad)} out of range for {n} rows")


class _QuantLinearFn(torch.autograd.Function):
    """Differentiable in x only (the base weight is frozen): grad_x = grad_y @ W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._forward(x)

    # LoRA fine-tuning on quantized weights (issue 13) backpropagates through here to reach
    # the adapters of earlier layers.
    @staticmethod
    def backward(ctx, grad_y):
        return ctx.layer.grad_input(grad_y), None
