import pytest

import diptych


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    return diptych.load(smollm2_path, n_ctx=2048)


@pytest.fixture(scope="session")
def qwen2(qwen_path):
    return diptych.load(qwen_path, n_ctx=2048)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    return diptych.load(gemma3_path, n_ctx=2048)
