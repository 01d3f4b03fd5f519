"""Real GGUF blocks for the kernel tests: gguf-py's quantizers where it has them, random
valid blocks (tests/quant's generator) for the K-quants and IQ4_NL."""

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from diptych.quant import QuantTensor

from ...quant.test_dequant import F16_FIELDS, random_blocks

KERNEL_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K]
GGUF_PY_QUANTIZERS = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def make_weight(ggml_type, n_rows, n_cols, seed=0, moderate=True) -> QuantTensor:
    """`moderate=False` keeps random_blocks' scales (any finite half: subnormals, 6e4)."""
    rng = np.random.default_rng(seed)
    block, _ = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in GGUF_PY_QUANTIZERS:
        values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        data = gguf.quants.quantize(values, ggml_type)
    else:
        data = random_blocks(ggml_type, n_rows * n_cols // block, rng)
        for off in F16_FIELDS[ggml_type] if moderate else ():  # fp16 results stay finite
            half = rng.uniform(-0.02, 0.02, len(data)).astype(np.float16)
            data[:, off:off + 2] = half.view(np.uint8).reshape(-1, 2)
    return QuantTensor(f"w.{ggml_type.name}", ggml_type, (n_rows, n_cols),
                       np.ascontiguousarray(data).reshape(n_rows, -1))


def cols_for(ggml_type) -> int:
    """A row length that leaves a partial tile: 3 blocks, or 2 super-blocks."""
    return 512 if GGML_QUANT_SIZES[ggml_type][0] == 256 else 96
