"""llama.cpp's activation rounding (backends/torch/cpu/llama_rounding.py) against ggml's own
blocks: q8_0 against gguf-py's Q8_0 quantizer (bit-exact with ggml's reference), q8_1 and
q8_K against ggml's reference quantizers' bytes (tests/fixtures/ggml_activation_blocks.json,
scripts/make_activation_blocks_fixture.py); and the Q4_1 product against ggml's block
formula, sum over blocks of d_w d_x sum(q_w q_x) + m_w s_x."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from diptych.backends.torch.cpu.llama_rounding import (RoundingQuantLinear, q8_0, q8_1_sums,
                                                       q8_K_values)
from diptych.quant import QuantTensor
from diptych.quant.dequant import as_blocks, unpack_q4_1

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "ggml_activation_blocks.json"


@pytest.fixture(scope="module")
def ggml():
    ref = json.loads(FIXTURE.read_text())
    x = np.frombuffer(base64.b64decode(ref["x"]), np.float32).reshape(ref["shape"]).copy()
    return x, {k: base64.b64decode(ref[k]) for k in ("q8_1", "q8_K")}


def q8_0_bytes(x: np.ndarray) -> bytes:
    q, _, d16 = q8_0(torch.from_numpy(x))
    d = d16.numpy().astype(np.float16).view(np.uint8)
    return np.concatenate([d, q.numpy().astype(np.int8).view(np.uint8)], -1).tobytes()


def test_q8_0_is_gguf_py_q8_0_byte_for_byte(ggml):
    x, _ = ggml
    rng = np.random.default_rng(0)
    ties = (rng.integers(-127, 127, (4, 512)) + 0.5).astype(np.float32)  # exact halves of d
    ties[:, ::32] = 127                                                   # when amax = 127
    for rows in (x, ties, rng.standard_normal((3, 1024)).astype(np.float32) * 1e-3):
        assert q8_0_bytes(rows) == gguf.quants.quantize(rows, T.Q8_0).tobytes()


def test_q8_1_is_ggml_q8_1_byte_for_byte(ggml):
    x, blocks = ggml
    q, d, d16 = q8_0(torch.from_numpy(x))
    raw = np.frombuffer(blocks["q8_1"], np.uint8).reshape(*q.shape[:-1], 36)
    fields = raw[..., :4].copy().view(np.float16).astype(np.float32)   # d, s
    # the values the product uses, compared as they are (not rounded again on the way)
    assert np.array_equal(d16.squeeze(-1).numpy(), fields[..., 0])
    assert np.array_equal(q8_1_sums(q, d).numpy(), fields[..., 1])
    assert np.array_equal(q.numpy().astype(np.int8), raw[..., 4:].view(np.int8))


def test_q8_K_values_are_ggml_q8_K(ggml):
    x, blocks = ggml
    raw = np.frombuffer(blocks["q8_K"], np.uint8).reshape(-1, 292)
    d = raw[:, :4].copy().view(np.float32)
    q = raw[:, 4:260].view(np.int8).astype(np.float32)
    expected = (q * d).reshape(x.shape)
    assert np.array_equal(q8_K_values(torch.from_numpy(x)).numpy(), expected)


def test_q4_1_product_is_ggml_block_formula(ggml):
    x = ggml[0].copy()
    x[1] *= 1e-2   # block sums up to about 1e4, spaced 8 apart in fp16 (1e4: they overflow)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, x.shape[1])).astype(np.float32)
    data = gguf.quants.quantize(w, T.Q4_1)
    lin = RoundingQuantLinear.from_quant_tensor(QuantTensor("w", T.Q4_1, (48, x.shape[1]),
                                                            data))
    y = lin.forward(torch.from_numpy(x)).numpy()

    dw, mw, qw = (a.astype(np.float64) for a in unpack_q4_1(as_blocks(data.reshape(-1), T.Q4_1)))
    dw, mw, qw = dw.reshape(48, -1), mw.reshape(48, -1), qw.reshape(48, -1, 32)
    q, d, d16 = q8_0(torch.from_numpy(x))
    s = q8_1_sums(q, d).numpy().astype(np.float64)                 # (rows, blocks)
    qx, dx = q.numpy().astype(np.float64), d16.squeeze(-1).numpy().astype(np.float64)
    sumi = np.einsum("rbj,nbj->rnb", qx, qw)
    expected = np.einsum("nb,rb,rnb->rn", dw, dx, sumi) + s @ mw.T
    scale = np.einsum("nb,rb,rnb->rn", np.abs(dw), dx, np.abs(qx).sum(-1)[:, None, :]
                      * 15) + np.abs(s) @ np.abs(mw).T
    assert np.all(np.abs(y - expected) <= 1e-5 * scale + 1e-30)
    # without the fp16 block sums (the exact product of the rounded rows) it is further off
    plain = np.einsum("nb,rb,rnb->rn", dw, dx, sumi) + (dx * qx.sum(-1)) @ mw.T
    assert np.abs(plain - expected).max() > 100 * np.abs(y - expected).max()
