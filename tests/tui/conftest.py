"""The chat app's tests: each gets its own data folder (SQLite database, settings file)."""

from __future__ import annotations

import asyncio

import pytest

import diptych


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """A fresh data folder, an empty Hugging Face cache, and tmp_path as the working folder."""
    path = tmp_path / "data"
    monkeypatch.setenv("DIPTYCH_DATA_DIR", str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def no_downloads(tmp_path, monkeypatch):
    """An empty model cache, so that the model picker offers nothing this machine
    downloaded (not for tests that run a model: the CPU kernels' cache lives there too)."""
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(smollm2_path):
    """The default model, loaded once per test module."""
    return diptych.load(smollm2_path, backend="torch", n_ctx=1024)


def run(coro):
    """Run a Pilot test body (tests are plain functions: no asyncio plugin needed)."""
    return asyncio.run(coro)
