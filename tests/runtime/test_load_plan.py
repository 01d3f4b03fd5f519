"""The load plan: what it reads and estimates before building anything, and that the
engine it builds matches the estimate."""

from types import SimpleNamespace

import pytest

from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.errors import InvalidArgumentError, ModelFileError, OutOfMemoryError
from diptych.inference import memory
from diptych.load_plan import LoadPlan
from diptych.quant.gguf_file import GGUFFile

from ..tiny_models import tiny_hf_model, write_gguf


class NoWeights(CpuBackend):
    """A backend that fails at any weight prepared: planning reads sizes only."""

    def prepare(self, qt):
        raise AssertionError(f"planning prepared {qt.name}")

    def prepare_stacked(self, name, parts):
        raise AssertionError(f"planning prepared {name}")

    def prepare_experts(self, qt):
        raise AssertionError(f"planning prepared {qt.name}")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A model with both cache kinds: sliding-window rings and full layers."""
    return write_gguf(tiny_hf_model("gemma3", seed=5), "gemma3",
                      tmp_path_factory.mktemp("plan") / "m.gguf", "Q8_0")


def test_planning_builds_nothing_and_the_engine_matches_the_estimate(gemma3):
    plan = LoadPlan.open(gemma3, NoWeights(), n_ctx=64, n_batch=8)
    assert plan.config.arch == "gemma3" and plan.n_ctx == 64 and plan.path == gemma3
    f = GGUFFile(gemma3)
    padding = gemma3.stat().st_size - f.data_offset - plan.weight_bytes  # tensor alignment
    assert 0 <= padding < f.alignment * len(f.tensors)
    built = LoadPlan.open(gemma3, "torch", device="cpu", n_ctx=64, n_batch=8)
    assert built.cache_bytes == plan.cache_bytes
    engine = built.engine()
    assert engine.cache_bytes == plan.cache_bytes and engine.capacity == 64
    # rings grow by the rollback slots asked for, and the estimate with them
    spec = LoadPlan.open(gemma3, "torch", device="cpu", n_ctx=64, n_batch=8, max_rollback=5)
    assert spec.cache_bytes > plan.cache_bytes
    assert spec.engine().cache_bytes == spec.cache_bytes


def test_a_plan_that_does_not_fit_is_refused_before_any_weight(gemma3, monkeypatch):
    plan = LoadPlan.open(gemma3, NoWeights(), n_ctx=64)
    monkeypatch.setattr(memory, "available_bytes", lambda: plan.weight_bytes)
    with pytest.raises(OutOfMemoryError, match="m.gguf with n_ctx=64"):
        plan.engine()


def test_a_load_lets_the_files_pages_go_every_so_many_bytes_and_at_its_end(tmp_path,
                                                                          monkeypatch):
    """LoadPlan.weights lets the mapped file's pages go every RELEASE_BYTES read (a
    whole-file release walks every page table of the file, so not after each tensor) and
    once more when the weights are prepared: nothing of the file stays resident."""
    import psutil

    from diptych import load_plan

    path = write_gguf(tiny_hf_model("llama", seed=6), "llama", tmp_path / "m.gguf", "Q8_0")
    plan = LoadPlan.open(path, "torch", device="cpu", n_ctx=32)   # no other mapping of it
    calls = []
    whole_file = plan.source.release_pages
    monkeypatch.setattr(plan.source, "release_pages", lambda: calls.append(whole_file()))
    monkeypatch.setattr(load_plan, "RELEASE_BYTES", plan.weight_bytes // 3)
    plan.engine()
    assert 3 <= len(calls) <= 4 < len(plan.source.tensors)
    resident = sum(m.rss for m in psutil.Process().memory_maps() if m.path == str(path))
    assert resident < path.stat().st_size // 8


def test_a_source_opened_elsewhere(gemma3):
    f = GGUFFile(gemma3)
    plan = LoadPlan.from_source(SimpleNamespace(metadata=f.metadata, tensors=f.tensors),
                                "torch", device="cpu", n_ctx=32)
    assert plan.path is None and plan.config == LoadPlan.open(gemma3, n_ctx=32).config
    assert plan.engine().eval([1, 2, 3]).shape == (1, plan.config.vocab_size)


@pytest.mark.parametrize("n_batch", [0, -1, 2.5, True])
def test_bad_n_batch_is_refused_before_the_file_is_read(tmp_path, n_batch):
    with pytest.raises(InvalidArgumentError, match="n_batch"):
        LoadPlan.open(tmp_path / "missing.gguf", n_batch=n_batch)
    with pytest.raises(ModelFileError):
        LoadPlan.open(tmp_path / "missing.gguf")
