"""load(numerics=): the names it takes, where llama.cpp's numerics run, and what the CPU
backend prepares with them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.backends.torch.cpu.llama_rounding import RoundingQuantLinear
from diptych.backends.torch.cpu.qlinear import QuantLinear
from diptych.errors import InvalidArgumentError
from diptych.numerics import apply_numerics, backend_for, check_numerics
from diptych.quant import QuantTensor


def test_unknown_numerics_is_refused():
    with pytest.raises(InvalidArgumentError, match="'exact', 'fast', 'llama.cpp'"):
        check_numerics("llamacpp")


def test_llama_cpp_numerics_choose_the_cpu_backend_unless_told():
    assert backend_for("llama.cpp", "auto", None) == ("torch", "cpu")
    assert backend_for("llama.cpp", "mlx", None) == ("mlx", None)
    assert backend_for("exact", "auto", None) == ("auto", None)


def test_cpu_backend_prepares_rounding_linears_only_when_asked():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    qt = QuantTensor("w", T.Q4_0, (8, 64), gguf.quants.quantize(w, T.Q4_0))
    be = CpuBackend()
    assert type(be.prepare(qt)) is QuantLinear
    apply_numerics(be, "llama.cpp")
    assert type(be.prepare(qt)) is RoundingQuantLinear


def test_other_backends_refuse_llama_cpp_numerics():
    pytest.importorskip("mlx")
    from diptych.backends import select

    with pytest.raises(InvalidArgumentError, match="torch backend on the CPU only"):
        apply_numerics(select("mlx", "cpu"), "llama.cpp")
