"""The runtime's sampler on the CUDA backend's ops (under the interpreter on the CPU), against
llama.cpp's own sampler chain among others; tests/runtime/test_sampler*.py run the same
checks on the other backends."""

import numpy as np
import pytest
import torch

from diptych.backends.torch.cuda.backend import CudaBackend
from diptych.inference.sampling import SamplingParams

from ...sampler_checks import (check_against_llama_cpp, check_block_rows_equal_single_rows,
                               check_non_finite_rows_are_flagged, llama_cpp_fixture)
from .conftest import DEVICE


@pytest.fixture(scope="module")
def be():
    return CudaBackend(DEVICE, dtype=torch.float32)


def test_rows_of_a_block_equal_rows_one_by_one(be):
    logits = np.random.default_rng(4).standard_normal((3, 64)) * 2
    histories = [[], [int(np.argmax(logits[1]))] * 2, list(map(int, np.argsort(-logits[2])[:4]))]
    check_block_rows_equal_single_rows(be, logits, histories, SamplingParams(
        temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.2))


def test_non_finite_logits_are_flagged(be):
    check_non_finite_rows_are_flagged(be)


@pytest.mark.parametrize("case", sorted(llama_cpp_fixture()[2]))
def test_filtered_distribution_equals_llama_cpp(be, case):
    check_against_llama_cpp(be, case)
