"""Hostile Hugging Face folders (defect 8 of the hostile-input issue): malformed JSON of
every file diptych reads, overflowing safetensors shapes, and an index that points outside
the folder are refused with a ModelFileError naming the file or field."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest

from . import probes
from .files import copy_folder
from .isolation import assert_refused, assert_text


def _edit_json(path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _write_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_the_base_folder_loads(isolated, bases):
    assert_text(isolated(probes.generate, bases["hf"]))


@pytest.mark.parametrize("name, change, names", [
    ("config.json", lambda c: [c], ["config.json", "JSON object"]),
    ("config.json", lambda c: {k: v for k, v in c.items() if k != "vocab_size"},
     ["vocab_size"]),
    ("config.json", lambda c: {**c, "vocab_size": "320"}, ["vocab_size"]),
    ("config.json", lambda c: {**c, "num_hidden_layers": 2**31 - 2}, ["num_hidden_layers"]),
    ("config.json", lambda c: {**c, "vocab_size": 2**31 - 2}, ["vocab_size"]),
    ("config.json", lambda c: {**c, "rope_parameters": [1, 2]}, ["config.json"]),
    ("config.json", lambda c: {**c, "rms_norm_eps": "tiny"}, ["layer_norm_rms_epsilon"]),
    ("tokenizer.json", lambda t: [t], ["tokenizer.json", "JSON object"]),
    ("tokenizer.json", lambda t: {**t, "model": {**t["model"], "vocab": [1, 2]}},
     ["tokenizer.json"]),
    ("tokenizer.json", lambda t: {**t, "model": {**t["model"], "vocab": {"a": 2**40}}},
     ["tokenizer.json", "token id"]),
    ("tokenizer.json", lambda t: {**t, "added_tokens": [{"id": -5, "content": "x"}]},
     ["tokenizer.json", "token id"]),
    ("tokenizer_config.json", lambda t: [t], ["tokenizer_config.json"]),
])
def test_malformed_json_is_refused_naming_it(isolated, bases, tmp_path, name, change, names):
    folder = copy_folder(bases["hf"], tmp_path / "m")
    _edit_json(folder / name, change)
    assert_refused(isolated(probes.generate, folder), *names, error="ModelFileError")


def test_safetensors_shape_whose_size_overflows_is_refused(isolated, bases, tmp_path):
    folder = copy_folder(bases["hf"], tmp_path / "m")
    _write_safetensors(folder / "model-extra.safetensors",
                       {"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]}},
                       bytes(16))
    assert_refused(isolated(probes.generate, folder), "model-extra.safetensors",
                   error="ModelFileError")


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2.5, 4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0]},
    ["F32", [4], [0, 16]],
])
def test_safetensors_header_entries_of_the_wrong_shape(isolated, bases, tmp_path, entry):
    folder = copy_folder(bases["hf"], tmp_path / "m")
    _write_safetensors(folder / "model-extra.safetensors", {"w": entry}, bytes(16))
    assert_refused(isolated(probes.generate, folder), "corrupt header entry",
                   error="ModelFileError")


def _index(folder, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_weight_map_that_is_a_list_is_refused(isolated, bases, tmp_path):
    folder = copy_folder(bases["hf"], tmp_path / "m")
    _index(folder, ["model.safetensors"])
    assert_refused(isolated(probes.generate, folder), "weight_map", error="ModelFileError")


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "../outside.safetensors",
                                   "/etc/passwd"])
def test_index_paths_must_stay_inside_the_folder(isolated, bases, tmp_path, shard):
    """A shard outside the folder is refused before it is opened, even a valid one."""
    folder = copy_folder(bases["hf"], tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _index(folder, {"model.embed_tokens.weight": shard})
    assert_refused(isolated(probes.generate, folder), "outside the model folder",
                   error="ModelFileError")


# -- the fuzzer over config.json ----------------------------------------------------------------

KEYS = ["vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "hidden_size", "intermediate_size", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "model_type"]
VALUES = ["x", [1, 2], {"a": 1}, None, True, 0, 1, 3, -1, 2**40, 1.5, 0.0, -1.0, 1e30,
          math.nan, math.inf]


def _config_cases() -> list:
    rng = random.Random(8)
    return [pytest.param(key, value, id=f"{key}-{value!r:.10}")
            for key in KEYS for value in rng.sample(VALUES, 3)]


@pytest.mark.parametrize("key, value", _config_cases())
def test_config_fuzz_is_refused_or_loads(isolated, bases, tmp_path, key, value):
    folder = copy_folder(bases["hf"], tmp_path / "m")
    _edit_json(folder / "config.json", lambda c: {**c, key: value})
    outcome = isolated(probes.generate, folder)
    if outcome.status == "returned":
        assert_text(outcome)
    else:
        assert outcome.status == "raised" and outcome.diptych_error, str(outcome)
