"""ModelConfig: the architecture-agnostic hyper-parameters and switches the one graph reads.

Families (runtime/families) fill these from GGUF metadata; nothing else in the runtime
knows which family a model belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rope import RopeScaling


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts FFN: routing and the experts' shapes."""

    n_experts: int
    n_used: int              # experts each token is routed to (top-k)
    d_ff: int                # hidden size of one routed expert
    gating: str = "softmax"  # "softmax" (Mixtral, Qwen3-MoE, DeepSeek-V2) | "sigmoid" (V3)
    norm_topk: bool = True   # renormalise the chosen experts' weights to sum to 1
    scale: float = 1.0       # routed_scaling_factor, applied to the routing weights
    n_groups: int = 1        # group-limited routing: experts in n_groups groups, ...
    n_groups_used: int = 1   # ... tokens choose among the best n_groups_used groups
    score_bias: bool = False  # DeepSeek-V3: a bias added to scores for selection only
    n_shared: int = 0        # shared experts (one dense FFN of n_shared * d_ff) on every token
    first_dense: int = 0     # the first layers use a dense FFN instead

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): K/V compressed into one latent."""

    q_lora_rank: int    # 0: queries come from one full projection
    kv_lora_rank: int
    qk_nope: int        # per-head query/key channels without RoPE
    qk_rope: int        # per-head channels with RoPE (the key part is shared by all heads)
    v_head_dim: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_dim: int
    qkv_bias: bool = False
    tied_output: bool = False
    # switches: how families differ, as data the one graph reads (docs/ARCHITECTURE.md)
    act: str = "silu"                 # FFN gate activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU)
    qk_norm: bool = False             # RMSNorm over each head of q and k (Qwen3, Gemma 3)
    post_norms: bool = False          # RMSNorm on the attention and FFN outputs (Gemma)
    embed_scale: float = 1.0          # token embeddings are multiplied by this (Gemma: sqrt(d))
    attn_scale: float = 0.0           # softmax scale; 0 means 1/sqrt(key head size)
    final_softcap: float = 0.0        # logits = c * tanh(logits / c) when > 0
    sliding_window: int = 0           # tokens a sliding-window layer sees (itself included)
    window_layers: tuple = ()         # per layer: True where attention is sliding-window
    rope_theta_local: float = 0.0     # RoPE base of the sliding-window layers (0: rope_theta)
    rope_scaling: RopeScaling | None = None  # of the layers at rope_theta
    moe: MoESpec | None = None
    mla: MLASpec | None = None

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_window_layer(self, layer: int) -> bool:
        return bool(self.window_layers) and bool(self.window_layers[layer])

    def layer_rope_theta(self, layer: int) -> float:
        if self.rope_theta_local and self.is_window_layer(layer):
            return self.rope_theta_local
        return self.rope_theta

    def softmax_scale(self) -> float:
        if self.attn_scale:
            return self.attn_scale
        key_dim = self.mla.qk_nope + self.mla.qk_rope if self.mla else self.head_dim
        return key_dim ** -0.5 * (self.rope_scaling.softmax_factor() if self.rope_scaling else 1.0)

    def kv_layer_values(self) -> tuple[int, int]:
        """(values one token stores in one layer's cache, of which V values)."""
        if self.mla:  # the normalised latent, then the RoPE'd shared key part; V is a view
            return self.mla.kv_lora_rank + self.mla.qk_rope, 0
        return 2 * self.kv_dim, self.kv_dim
