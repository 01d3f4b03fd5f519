"""Speculative decoding's costs are measured on a machine's first use of a model pair, told
to the first-use listener, kept in the cache folder, and read back by later Models of the
same files: they are not measured again (and so do not change the draft lengths); the
entries of changed files are dropped."""

import json
import os
from dataclasses import asdict

import pytest

import diptych
from diptych.inference import speculative_costs
from diptych.inference.speculative import DEFAULT_DRAFT_MAX
from diptych.inference.speculative_costs import FILE_NAME, MEASURING
from diptych.model.adapter_files import write_adapter

from ..tiny_models import tiny_hf_model, write_gguf
from .training.random_adapter import random_adapter

PROMPT = [5, 9, 17, 5, 9, 17, 5, 9, 23, 41]


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setattr(speculative_costs, "cache_dir", lambda: tmp_path / "cache")
    return write_gguf(tiny_hf_model("llama", seed=1), "llama", tmp_path / "m.gguf")


def _generate(path, heard: list):
    """A new Model of `path` generating with prompt lookup; its costs."""
    model = diptych.load(path, backend="torch", device="cpu", n_ctx=64)
    model.backend.on_first_use(heard.append)
    try:
        model.generate(PROMPT, max_tokens=4, temperature=0, speculative="lookup")
    finally:
        model.backend.on_first_use(None)
    return model._spec_costs[("lookup", DEFAULT_DRAFT_MAX)]


def test_costs_are_measured_once_then_read_from_the_cache_folder(model_file, tmp_path):
    heard = []
    first = _generate(model_file, heard)
    assert heard[heard.index(MEASURING) + 1] is None
    stored = json.loads((tmp_path / "cache" / FILE_NAME).read_text())
    (key, entry), = stored.items()
    assert entry["costs"] == asdict(first)
    assert str(model_file.resolve()) in key and "lookup" in key and "torch (cpu)" in key

    heard.clear()
    assert _generate(model_file, heard) == first and MEASURING not in heard

    st = model_file.stat()   # the same path with other contents is another model...
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _generate(model_file, heard)
    assert MEASURING in heard
    (new_key,) = json.loads((tmp_path / "cache" / FILE_NAME).read_text())
    assert new_key != key   # ...and the old model's entry is gone


def test_an_unreadable_cache_file_or_entry_costs_a_measurement_only(model_file, tmp_path):
    stored = tmp_path / "cache" / FILE_NAME
    stored.parent.mkdir()
    stored.write_text("{not json")
    heard = []
    costs = _generate(model_file, heard)
    assert MEASURING in heard
    entries = json.loads(stored.read_text())
    assert [entry["costs"] for entry in entries.values()] == [asdict(costs)]

    for bad in ({"draft": "fast", "verify": 0.2}, {"draft": -1.0, "verify": 0.2}, [0.1, 0.2]):
        (key,) = entries
        stored.write_text(json.dumps({key: {**entries[key], "costs": bad}}))
        heard.clear()
        remeasured = _generate(model_file, heard)   # (timings: not the first's exactly)
        assert MEASURING in heard
        assert json.loads(stored.read_text())[key]["costs"] == asdict(remeasured)


def test_an_adapter_swapped_in_has_costs_of_its_own(model_file, tmp_path):
    model = diptych.load(model_file, backend="torch", device="cpu", n_ctx=64)
    heard = []
    model.backend.on_first_use(heard.append)
    try:
        model.generate(PROMPT, max_tokens=4, temperature=0, speculative="lookup")
        write_adapter(random_adapter(model, 1), model.config, tmp_path / "adapter")
        model.set_adapter(tmp_path / "adapter")
        heard.clear()
        model.generate(PROMPT, max_tokens=4, temperature=0, speculative="lookup")
    finally:
        model.backend.on_first_use(None)
    assert MEASURING in heard
    keys = json.loads((tmp_path / "cache" / FILE_NAME).read_text())
    assert len(keys) == 2 and sum(f"adapter {(tmp_path / 'adapter').resolve()}" in k
                                  for k in keys) == 1
