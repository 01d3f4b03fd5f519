"""The runtime's sampler against llama.cpp's own sampler chain (the committed fixture
tests/fixtures/sampler_llama_cpp.npz), on torch's CPU backend and MLX; CUDA:
tests/backends/cuda/test_cuda_sampler.py."""

import pytest

from diptych.backends import select

from ..sampler_checks import check_against_llama_cpp, llama_cpp_fixture


@pytest.fixture(params=["torch", "mlx"])
def be(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return select(request.param, "cpu")


@pytest.mark.parametrize("case", sorted(llama_cpp_fixture()[2]))
def test_filtered_distribution_equals_llama_cpp(be, case):
    check_against_llama_cpp(be, case)


@pytest.mark.parametrize("case", sorted(llama_cpp_fixture()[2]))
def test_filtered_distribution_equals_llama_cpp_in_a_wide_vocabulary(be, case):
    # 151,936 ids (Qwen's): the wide rows' own paths (the CPU's chunked top-k, penalties on
    # the ids seen only) and a last chunk cut short
    check_against_llama_cpp(be, case, vocab=151936 + 45)


def test_a_token_mask_bans_as_a_minus_inf_bias_does(be):
    check_against_llama_cpp(be, "logit_bias", as_mask=True)
