"""ModelConfig: the architecture-agnostic hyper-parameters the one graph reads."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    extra: dict = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_elements_per_token(self) -> int:
        """K and V values one token adds to a full cache, over all layers."""
        return 2 * self.n_layers * self.kv_dim
