"""Which arithmetic a loaded model's products use: `load(numerics=...)`.

"fast" (the default): each backend's fastest products. On a CPU with AVX-512 VNNI the torch
backend rounds each inference step's activations to 8 bits per 32 values before a quantized
weight and multiplies in integers (backends/torch/cpu/int8_activations.py), as llama.cpp
does; everywhere else this is "exact". "exact": every backend multiplies the weights,
exactly dequantized, by its activations at their own precision (reproducible across CPUs:
what `diptych perplexity` measures with). "llama.cpp": the torch backend on the CPU rounds each
product's input as llama.cpp's CPU backend does (8-bit blocks before a quantized weight,
fp16 before an F16 one; backends/torch/cpu/llama_rounding.py), so that perplexities and
logits compare with figures published from llama.cpp. With the default backend ("auto")
it chooses the torch backend on the CPU.
"""

from __future__ import annotations

from diptych.errors import InvalidArgumentError

NUMERICS = ("fast", "exact", "llama.cpp")


def check_numerics(numerics: str) -> None:
    if numerics not in NUMERICS:
        raise InvalidArgumentError(f"numerics={numerics!r}: expected one of "
                                   f"{', '.join(map(repr, NUMERICS))}")


def backend_for(numerics: str, backend, device: str | None):
    """The (backend, device) to load on: llama.cpp's numerics are its CPU backend's."""
    if numerics == "llama.cpp" and backend == "auto" and device is None:
        return "torch", "cpu"
    return backend, device


def apply_numerics(backend, numerics: str) -> None:
    """Set the backend up for `numerics` before any weight is prepared."""
    if numerics == "llama.cpp":
        backend.use_llama_cpp_rounding()
    elif numerics == "exact":
        backend.use_exact_products()
