"""Which arithmetic a loaded model's products use: `load(numerics=...)`.

"exact" (the default): every backend multiplies the weights, exactly dequantized, by its
activations at their own precision. "fast": each backend's fastest products; on a CPU with
AVX-512 VNNI the torch backend rounds each inference step's activations to 8 bits per 32
values before a quantized weight and multiplies in integers
(backends/torch/cpu/int8_activations.py), as llama.cpp does, and on a CPU with AMX its
prompt steps of more than a few dozen positions multiply bf16 copies instead; elsewhere it
is "exact". Not the default because rounding makes outputs depend on fp32-level
differences: two runs whose prompts were cut or batched differently (a reused prompt
prefix, a server's batch, prompt chunks) differ by about the rounding's error instead of a
few ulps, so their greedy texts part at close margins, not only at near-ties. Speculative
verify steps are not such a difference on the CPU: up to decode_attention.MAX_QUERIES
positions, a step computes each position as a one-position step does, bit for bit, so
speculative decoding with "fast" emits exactly what plain decoding with "fast" does (models
without mixture-of-experts layers or MLA, whose routing and latent products run torch ops).

"llama.cpp": the torch backend on the CPU rounds each product's input as llama.cpp's CPU
backend does (8-bit blocks before a quantized weight, fp16 before an F16 one;
backends/torch/cpu/llama_rounding.py), so that perplexities and logits compare with
figures published from llama.cpp. With the default backend ("auto") it chooses the torch
backend on the CPU.
"""

from __future__ import annotations

from diptych.errors import InvalidArgumentError

NUMERICS = ("exact", "fast", "llama.cpp")


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
    elif numerics == "fast":
        backend.use_fast_products()
