"""A LoRA adapter with non-zero random pairs on every projection of a loaded model."""

import numpy as np

from diptych.model.adapter_files import LoraAdapter
from diptych.model.adapters import target_shape
from diptych.training.lora import choose_targets


def random_adapter(model, seed: int, rslora: bool = False) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    pairs = {}
    for i, module in choose_targets(model.config, model.engine.weights, None, None):
        n_out, n_in = target_shape(model.config, i, module)
        pairs[i, module] = (rng.standard_normal((4, n_in)).astype(np.float32) * 0.2,
                            rng.standard_normal((n_out, 4)).astype(np.float32) * 0.2)
    return LoraAdapter(pairs, alpha=6.0, rank=4, rslora=rslora, base_model="tiny-llama")
