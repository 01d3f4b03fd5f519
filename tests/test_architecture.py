"""The architecture's rules, checked on the code: the runtime never imports an array library
and backends hold no policy code (backends supply the mechanism), and `diptych.load` takes
any Backend instance."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diptych
from diptych.backends.torch.cpu.backend import CpuBackend
from diptych.errors import InvalidArgumentError

from .tiny_models import logits, tiny_hf_model, write_gguf

ROOT = Path(__file__).resolve().parents[1]
ARRAY_LIBRARIES = {"torch", "mlx", "triton"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_sees_imports_anywhere_in_a_file(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    from torch.nn import functional\n"
                 "    import mlx.core as mx\nfrom . import triton\n")
    assert imported_modules(f) == {"os", "torch", "mlx"}


def test_runtime_imports_no_array_library():
    files = sorted((ROOT / "runtime").rglob("*.py"))
    assert len(files) > 30
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & ARRAY_LIBRARIES)
                 for f in files}
    assert {f: libs for f, libs in offenders.items() if libs} == {}


def test_importing_the_runtime_loads_no_array_library():
    """Indirectly either: every runtime module imported in a fresh interpreter."""
    modules = ["diptych." + ".".join(f.relative_to(ROOT / "runtime").with_suffix("").parts)
               for f in sorted((ROOT / "runtime").rglob("*.py"))
               if f.name not in ("__init__.py", "__main__.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            f"set({sorted(ARRAY_LIBRARIES)!r})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "tests")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def identifiers(path: Path) -> set[str]:
    """Every name a file defines or uses: functions, classes, arguments, variables,
    attributes, keywords and imported modules."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.update(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(node.module.split("."))
    return names


# Per concern, the names of the runtime's policy code (its parameters, filters, modules):
# none may appear under backends/, which supplies mechanism only.
POLICY_NAMES = {
    "sampling": {"sampling", "sampler", "SamplingParams", "Sampler", "sample",
                 "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "penalty_last_n", "logit_bias",
                 "penalties", "apply_penalties", "greedy"},
}


def test_the_name_scan_sees_definitions_uses_and_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from diptych.inference.sampling import X\n"
                 "def sample(x, top_p=1):\n    return x.min_p + temperature(logit_bias=1)\n")
    assert {"sampling", "sample", "top_p", "min_p", "temperature", "logit_bias"} <= identifiers(f)


@pytest.mark.parametrize("concern", sorted(POLICY_NAMES))
def test_backends_hold_no_policy_code(concern):
    files = sorted((ROOT / "backends").rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(ROOT)): sorted(identifiers(f) & POLICY_NAMES[concern])
             for f in files}
    assert {f: names for f, names in found.items() if names} == {}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    hf = tiny_hf_model("llama", seed=4)
    return hf, write_gguf(hf, "llama", tmp_path_factory.mktemp("arch") / "m.gguf")


class CountingBackend(CpuBackend):
    """A backend of the caller's own: the CPU backend, counting the weights it prepares."""

    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare(self, qt):
        self.prepared.append(qt.name)
        return super().prepare(qt)

    def prepare_stacked(self, name, parts):
        self.prepared.append(name)
        return super().prepare_stacked(name, parts)

    def prepare_table(self, qt):
        self.prepared.append(qt.name)
        return super().prepare_table(qt)


def test_load_takes_a_backend_instance(tiny_llama):
    hf, path = tiny_llama
    be = CountingBackend()
    model = diptych.load(path, backend=be, n_ctx=32)
    assert model.backend is be
    # per layer qkv and gate/up (each fused), o and down; the embedding and the output head
    assert len(be.prepared) == 2 * 4 + 2
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight", "blk.1.attn_qkv",
            "blk.1.ffn_gate_up"} <= set(be.prepared)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, 12)]
    ours = model.logits(ids)
    named = diptych.load(path, backend="torch", device="cpu", n_ctx=32)
    assert isinstance(named.backend, CpuBackend) and named.backend is not be
    np.testing.assert_array_equal(ours, named.logits(ids))
    ref = logits(hf, ids)  # the instance ran the model (F32 weights): transformers' logits
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_device_with_a_backend_instance_is_refused(tiny_llama):
    with pytest.raises(InvalidArgumentError, match="instance"):
        diptych.load(tiny_llama[1], backend=CpuBackend(), device="cpu")


# what MoE routing reads: the MoESpec fields and the selection bias
ROUTING_FIELDS = {"gating", "n_used", "norm_topk", "n_groups", "n_groups_used", "score_bias"}


def routing_code(path: Path) -> set[str]:
    """Routing in a file: functions named route*, and reads of the routing fields."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("route"):
            found.add(f"def {node.name}")
        elif isinstance(node, ast.Attribute) and node.attr in ROUTING_FIELDS:
            found.add(f".{node.attr}")
    return found


def test_the_routing_scan_sees_routing(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def route(x, spec):\n    return x.topk(spec.n_used)\n")
    assert routing_code(f) == {"def route", ".n_used"}


def test_moe_routing_lives_in_the_runtime_only():
    """Backends run the chosen experts (expert_ffn); which experts, with what weights, is
    runtime/model/moe.py's."""
    files = sorted((ROOT / "backends").rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(ROOT)): sorted(routing_code(f)) for f in files}
    assert {f: names for f, names in found.items() if names} == {}
    assert routing_code(ROOT / "runtime" / "model" / "moe.py") >= {"def route", ".gating"}
