"""The LoRA pairs a run trains: which projections of which layers, their initial values,
and putting them in the weight tree before each forward pass."""

from __future__ import annotations

import numpy as np

from diptych.errors import InvalidArgumentError
from diptych.model.adapters import TARGETS, add_lora, has_target, target_shape
from diptych.model.config import ModelConfig
from diptych.model.weights import ModelWeights


_MLP = ("gate_proj", "up_proj", "down_proj")


def choose_targets(cfg: ModelConfig, weights: ModelWeights, modules: tuple[str, ...] | None,
                   layers: tuple[int, ...] | None) -> list[tuple[int, str]]:
    """(layer, module) pairs: `modules` (None: every projection a layer holds) on `layers`
    (None: all). A module named explicitly that a chosen layer lacks is an error."""
    chosen = range(cfg.n_layers) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if i >= cfg.n_layers]
    if bad:
        raise InvalidArgumentError(f"layer {bad[0]} does not exist (the model has "
                                   f"{cfg.n_layers} layers)")
    keys = []
    for i in chosen:
        layer = weights.layers[i]
        for module in (modules or TARGETS):
            if has_target(layer, module):
                keys.append((i, module))
            elif modules:
                routed = layer.experts is not None and module in _MLP
                raise InvalidArgumentError(f"layer {i} of this model has no {module}" + (
                    ": its MLP is routed experts alone, which take no adapters" if routed
                    else ""))
    if not keys:
        raise InvalidArgumentError("no projection to put an adapter on")
    return keys


def initial_pairs(cfg: ModelConfig, keys: list[tuple[int, str]], rank: int,
                  seed: int) -> list[np.ndarray]:
    """[A0, B0, A1, B1, ...] as PEFT starts them: A uniform in +-1/sqrt(in) (its
    kaiming-uniform with a = sqrt(5)), B zero, so training starts at the base model."""
    rng = np.random.default_rng(seed)
    out = []
    for i, module in keys:
        n_out, n_in = target_shape(cfg, i, module)
        bound = 1.0 / np.sqrt(n_in)
        out.append(rng.uniform(-bound, bound, (rank, n_in)).astype(np.float32))
        out.append(np.zeros((n_out, rank), np.float32))
    return out


def attach(cfg: ModelConfig, weights: ModelWeights, keys: list[tuple[int, str]], params,
           scale: float, dropout: float = 0.0, seeds: list[int] | None = None) -> None:
    """Replace every layer's adapters with the pairs params = [A0, B0, ...] on `keys`;
    with `dropout`, pair j's input mask is drawn from seeds[j]."""
    for layer in weights.layers:
        layer.adapters.clear()
    for j, ((i, module), a, b) in enumerate(zip(keys, params[::2], params[1::2])):
        if seeds is None:
            add_lora(cfg, weights.layers[i], module, a, b, scale)
        else:
            add_lora(cfg, weights.layers[i], module, a, b, scale, dropout, seeds[j])


def dropout_seeds(seed: int, update: int, micro_batch: int, n_pairs: int) -> list[int]:
    """The dropout mask seed of each pair for one micro-batch of one update: a function of
    the run's seed and the data position alone, so a resumed run draws the masks an
    uninterrupted one would (and a recomputed layer the ones its forward pass drew)."""
    state = np.random.SeedSequence([seed, update, micro_batch]).generate_state(2 * n_pairs,
                                                                               np.uint32)
    return [int(hi) << 31 | int(lo) >> 1 for hi, lo in zip(state[::2], state[1::2])]
