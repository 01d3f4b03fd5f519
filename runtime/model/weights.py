"""The weight tree: GGUF tensors mapped onto the graph's names and prepared by a backend.

Which tensors a layer has follows from the config (MLA, MoE, QK-norm, post-norms); a
tensor the config needs but the file lacks is a ModelFileError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.backends.base import RopeSpec

from .config import ModelConfig
from diptych.errors import ModelFileError
from .families.gguf import family_for
from .rope import layer_rope


@dataclass
class Experts:
    """Routed experts of one MoE layer: a router and the experts' gate, up and down
    matrices, each kind as the backend's `prepare_experts` holds it (a list of per-expert
    matrices, or one stacked weight)."""

    router: Any
    gate: Any = None
    up: Any = None
    down: Any = None
    score_bias: Any = None  # DeepSeek-V3: added to the scores for expert selection only


@dataclass
class LayerWeights:
    attn_norm: Any
    wo: Any
    ffn_norm: Any
    # attention projections (standard); when Q, K and V share a block type they are one
    # matrix wqkv (and bqkv), and gate/up one w_gate_up: one kernel call instead of three
    wqkv: Any = None
    bqkv: Any = None
    wq: Any = None
    wk: Any = None
    wv: Any = None
    bq: Any = None
    bk: Any = None
    bv: Any = None
    q_norm: Any = None
    k_norm: Any = None
    # MLA: queries through a low-rank bottleneck (wq_a, q_a_norm, wq_b) or one wq; keys and
    # values through the latent (wkv_a -> kv_a_norm), absorbed per head by k_b and v_b
    wq_a: Any = None
    q_a_norm: Any = None
    wq_b: Any = None
    wkv_a: Any = None
    kv_a_norm: Any = None
    k_b: Any = None
    v_b: Any = None
    post_attn_norm: Any = None
    post_ffn_norm: Any = None
    # FFN: a dense SwiGLU/GeGLU (in MoE layers: the shared experts), and routed experts
    w_gate_up: Any = None
    w_gate: Any = None
    w_up: Any = None
    w_down: Any = None
    experts: Experts | None = None
    # trainable LoRA pairs beside the frozen matrices above: matrix name -> [LoRA]
    # (model/adapters.py puts them there)
    adapters: dict[str, list] = field(default_factory=dict)


_MATRICES = ("wqkv", "wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "w_gate_up", "w_gate",
             "w_up", "w_down")


@dataclass
class ModelWeights:
    tok_embd: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any  # the same object as tok_embd when the output is tied
    ropes: list[RopeSpec] = field(default_factory=list)  # per layer

    def linears(self):
        """(name, prepared weight) for every quantizable matrix, each once."""
        yield "token_embd", self.tok_embd
        if self.output is not self.tok_embd:
            yield "output", self.output
        for i, layer in enumerate(self.layers):
            for name in _MATRICES:
                w = getattr(layer, name)
                if w is not None:
                    yield f"blk.{i}.{name}", w
            if layer.experts is not None:
                ex = layer.experts
                yield f"blk.{i}.router", ex.router
                for kind in ("gate", "up", "down"):
                    held = getattr(ex, kind)
                    if not isinstance(held, list):
                        yield f"blk.{i}.experts.{kind}", held
                        continue
                    for e, w in enumerate(held):
                        yield f"blk.{i}.expert{e}.{kind}", w


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation for interleaved RoPE.

    The converter stores each head's rows as (head_dim/2, 2) pairs; Hugging Face order is
    (2, head_dim/2). Reordering rows is exact for any block format (blocks run along rows).
    """
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def deinterleave_rope_rows(n_heads: int, head_rows: int, rope_dim: int) -> np.ndarray:
    """Row order putting the last `rope_dim` rows of each head from interleaved pairs
    (x0, y0, x1, y1, ...) into NeoX halves (x0, x1, ..., y0, y1, ...); other rows stay."""
    order = np.arange(n_heads * head_rows).reshape(n_heads, head_rows)
    rope = order[:, head_rows - rope_dim:].reshape(n_heads, rope_dim // 2, 2)
    order[:, head_rows - rope_dim:] = rope.swapaxes(1, 2).reshape(n_heads, rope_dim)
    return order.reshape(-1)


class _Source:
    """Reads tensors by name for one load: checks shapes, reports progress, prepares."""

    def __init__(self, tensors: dict, backend, progress):
        self.tensors, self.backend, self.progress = tensors, backend, progress

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...] | None = None):
        qt = self.tensors.get(name)
        if qt is None:
            raise ModelFileError(f"missing tensor {name}")
        if shape is not None and tuple(qt.shape) != shape:
            raise ModelFileError(f"tensor {name} has shape {qt.shape}, expected {shape}")
        if self.progress:
            self.progress(qt.nbytes)
        return qt

    def matrix(self, name, shape, order=None):
        return self.backend.prepare(self.tensor(name, shape, order))

    def tensor(self, name, shape, order=None):
        qt = self.get(name, shape)
        return qt if order is None else qt.take_rows(order)

    def values(self, name, n, order=None) -> np.ndarray:
        values = self.get(name, (n,)).dequantize()
        if not np.isfinite(values).all():  # cheap for vectors (norms, biases)
            raise ModelFileError(f"tensor {name} holds NaN or infinite values")
        return values if order is None else values[order]

    def vector(self, name, n, order=None):
        return self.backend.prepare_vector(self.values(name, n, order))

    def stacked(self, name, parts: list[tuple]):
        """Several matrices (name, shape, order) as one prepared matrix when they share a
        block type; None otherwise (the caller then prepares them one by one)."""
        if not all(p[0] in self.tensors for p in parts):
            return None  # the caller's one-by-one load names the missing tensor
        if len({self.tensors[p[0]].ggml_type for p in parts}) != 1:
            return None
        return self.backend.prepare_stacked(name, [self.tensor(*p) for p in parts])


def load_weights(tensors: dict, cfg: ModelConfig, backend,
                 progress: Callable[[int], None] | None = None) -> ModelWeights:
    """Prepare every tensor the graph needs, layer by layer; `progress(n)` is called with
    the number of bytes just handled."""
    fam = family_for(cfg.arch)
    src = _Source(tensors, backend, progress)
    matrix, vector = src.matrix, src.vector

    def qk_order(rows, heads):
        return unpermute_rows(rows, heads) if fam.permuted_qk else None

    d, ff = cfg.d_model, cfg.d_ff
    table = src.get("token_embd.weight", (cfg.vocab_size, d))
    tok = backend.prepare(table) if cfg.tied_output else backend.prepare_table(table)
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        if cfg.mla:
            attn = _mla_weights(cfg, p, src)
        else:
            q, kv, hd = cfg.q_dim, cfg.kv_dim, cfg.head_dim
            qkv = [(p + "attn_q.weight", (q, d), qk_order(q, cfg.n_heads)),
                   (p + "attn_k.weight", (kv, d), qk_order(kv, cfg.n_kv_heads)),
                   (p + "attn_v.weight", (kv, d))]
            attn = dict(wqkv=src.stacked(p + "attn_qkv", qkv),
                        wo=matrix(p + "attn_output.weight", (d, q)))
            if attn["wqkv"] is None:
                attn.update(wq=matrix(*qkv[0]), wk=matrix(*qkv[1]), wv=matrix(*qkv[2]))
            if cfg.qkv_bias:
                biases = [src.values(p + "attn_q.bias", q, qk_order(q, cfg.n_heads)),
                          src.values(p + "attn_k.bias", kv, qk_order(kv, cfg.n_kv_heads)),
                          src.values(p + "attn_v.bias", kv)]
                if attn["wqkv"] is not None:
                    attn["bqkv"] = backend.prepare_vector(np.concatenate(biases))
                else:
                    attn.update(zip(("bq", "bk", "bv"), map(backend.prepare_vector, biases)))
            if cfg.qk_norm:
                attn.update(q_norm=vector(p + "attn_q_norm.weight", hd),
                            k_norm=vector(p + "attn_k_norm.weight", hd))
        layer = LayerWeights(attn_norm=vector(p + "attn_norm.weight", d),
                             ffn_norm=vector(p + "ffn_norm.weight", d), **attn)
        if cfg.post_norms:
            layer.post_attn_norm = vector(p + "post_attention_norm.weight", d)
            layer.post_ffn_norm = vector(p + "post_ffw_norm.weight", d)
        moe = cfg.moe
        if moe and moe.is_moe_layer(i):
            layer.experts = _experts(cfg, p, src)
            if moe.n_shared:
                sh = moe.n_shared * moe.d_ff
                layer.w_gate = matrix(p + "ffn_gate_shexp.weight", (sh, d))
                layer.w_up = matrix(p + "ffn_up_shexp.weight", (sh, d))
                layer.w_down = matrix(p + "ffn_down_shexp.weight", (d, sh))
        else:
            gate_up = [(p + "ffn_gate.weight", (ff, d)), (p + "ffn_up.weight", (ff, d))]
            layer.w_gate_up = src.stacked(p + "ffn_gate_up", gate_up)
            if layer.w_gate_up is None:
                layer.w_gate, layer.w_up = matrix(*gate_up[0]), matrix(*gate_up[1])
            layer.w_down = matrix(p + "ffn_down.weight", (d, ff))
        layers.append(layer)
    norm = vector("output_norm.weight", d)
    out = tok if cfg.tied_output else matrix("output.weight", (cfg.vocab_size, d))
    return ModelWeights(tok, layers, norm, out, _ropes(cfg, src))


def _ropes(cfg: ModelConfig, src: _Source) -> list[RopeSpec]:
    """Each layer's RoPE. Scaling (and Llama 3's rope_freqs divisors) applies to the layers
    at the model's main base, not to sliding-window layers with a local base of their own."""
    dim = cfg.mla.qk_rope if cfg.mla else cfg.rope_dim
    factors = src.values("rope_freqs.weight", dim // 2) if src.has("rope_freqs.weight") else None
    if factors is not None and (factors <= 0).any():
        raise ModelFileError("tensor rope_freqs.weight holds divisors <= 0")
    specs = {}
    out = []
    for i in range(cfg.n_layers):
        theta = cfg.layer_rope_theta(i)
        if theta not in specs:
            main = theta == cfg.rope_theta
            specs[theta] = layer_rope(dim, theta, cfg.rope_scaling if main else None,
                                      factors if main else None)
        out.append(specs[theta])
    return out


def _experts(cfg, p, src: _Source) -> Experts:
    moe, d = cfg.moe, cfg.d_model
    n, ff = moe.n_experts, moe.d_ff
    ex = Experts(router=src.matrix(p + "ffn_gate_inp.weight", (n, d)))
    for kind, shape in (("gate", (n, ff, d)), ("up", (n, ff, d)), ("down", (n, d, ff))):
        stacked = src.get(p + f"ffn_{kind}_exps.weight", shape)
        setattr(ex, kind, src.backend.prepare_experts(stacked))
    if moe.score_bias:
        ex.score_bias = src.vector(p + "exp_probs_b.bias", n)
    return ex


def _mla_weights(cfg, p, src: _Source) -> dict:
    """MLA projections. RoPE channels are stored in interleaved pairs (as DeepSeek trains
    them); their rows are put into NeoX order so that every family uses one RoPE."""
    m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    qk = m.qk_nope + m.qk_rope
    q_order = deinterleave_rope_rows(h, qk, m.qk_rope)
    w = {}
    if m.q_lora_rank:
        w["wq_a"] = src.matrix(p + "attn_q_a.weight", (m.q_lora_rank, d))
        w["q_a_norm"] = src.vector(p + "attn_q_a_norm.weight", m.q_lora_rank)
        w["wq_b"] = src.matrix(p + "attn_q_b.weight", (h * qk, m.q_lora_rank), q_order)
    else:
        w["wq"] = src.matrix(p + "attn_q.weight", (h * qk, d), q_order)
    kv_rows = m.kv_lora_rank + m.qk_rope
    w["wkv_a"] = src.matrix(p + "attn_kv_a_mqa.weight", (kv_rows, d),
                            deinterleave_rope_rows(1, kv_rows, m.qk_rope))
    w["kv_a_norm"] = src.vector(p + "attn_kv_a_norm.weight", m.kv_lora_rank)
    # The per-head absorption matrices are batched matmuls over heads, held in the
    # activation dtype: W_UK (H, kv_lora, nope) folds into the query, W_UV (H, v, kv_lora)
    # maps the attention output from the latent space to values.
    if src.has(p + "attn_k_b.weight"):
        k_b = src.get(p + "attn_k_b.weight", (h, m.kv_lora_rank, m.qk_nope)).dequantize()
        v_b = src.get(p + "attn_v_b.weight", (h, m.v_head_dim, m.kv_lora_rank)).dequantize()
    else:  # older files: one kv_b (H * (nope + v), kv_lora)
        kv_b = src.get(p + "attn_kv_b.weight", (h * (m.qk_nope + m.v_head_dim), m.kv_lora_rank))
        kv_b = kv_b.dequantize().reshape(h, m.qk_nope + m.v_head_dim, m.kv_lora_rank)
        k_b, v_b = kv_b[:, :m.qk_nope].transpose(0, 2, 1), kv_b[:, m.qk_nope:]
    w["k_b"] = src.backend.prepare_dense(np.ascontiguousarray(k_b, dtype=np.float32))
    w["v_b"] = src.backend.prepare_dense(np.ascontiguousarray(v_b, dtype=np.float32))
    w["wo"] = src.matrix(p + "attn_output.weight", (d, h * m.v_head_dim))
    return w
