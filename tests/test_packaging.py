"""The wheel as users install it: built from the source tree, installed (not editable) into a
fresh virtual environment, every module of the package imported from there.

The modules are listed from the source folders, not from the wheel, so a subpackage missing
from pyproject.toml's explicit `packages` list fails here. The fresh environment sees the
test environment's third-party packages through a .pth line, which Python does not scan for
further .pth files: the editable install of diptych stays invisible.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"runtime": "diptych", "backends": "diptych.backends", "quant": "diptych.quant",
                "tui": "diptych.tui"}
OPTIONAL = {"torch", "numba", "triton", "mlx"}  # the extras; a module needing a missing one
                                                # is skipped, not failed


def source_modules() -> list[str]:
    mods = []
    for folder, package in PACKAGE_DIRS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__main__":  # runs the CLI when imported
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.append(".".join((package, *parts)))
    return mods


def source_data_files() -> list[str]:
    """Files other than Python sources the package ships, as paths inside the package."""
    out = []
    for folder, package in PACKAGE_DIRS.items():
        for f in sorted((ROOT / folder).rglob("*")):
            # __pycache__ holds Python's and numba's caches, never shipped data
            if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts:
                out.append("/".join((*package.split("."), *f.relative_to(ROOT / folder).parts)))
    return out


IMPORT_ALL = """
import importlib, json, sys
from pathlib import Path
import diptych
result = {"diptych": diptych.__file__, "imported": [], "skipped": [], "failed": {}}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
        result["imported"].append(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in set(json.loads(sys.argv[2])):
            result["skipped"].append(name)
        else:
            result["failed"][name] = repr(e)
    except Exception as e:
        result["failed"][name] = repr(e)
root = Path(diptych.__file__).parents[1]
result["missing_data"] = [p for p in json.loads(sys.argv[3]) if not (root / p).is_file()]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                            "--no-build-isolation", "--no-index", "-w", str(tmp / "dist")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel, = (tmp / "dist").glob("diptych-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                              "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    # appended after the venv's own site-packages: the wheel's diptych comes first anyway
    (site / "test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_every_module_imports_from_the_installed_wheel(installed, tmp_path):
    mods = source_modules()
    assert "diptych.load_plan" in mods and "diptych.backends.torch.cuda.kernels" in mods
    run = subprocess.run([str(installed), "-c", IMPORT_ALL, json.dumps(mods),
                          json.dumps(sorted(OPTIONAL)), json.dumps(source_data_files())],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert Path(result["diptych"]).is_relative_to(installed.parents[1])  # not the editable copy
    assert result["failed"] == {}
    assert result["missing_data"] == []
    assert set(result["imported"]) | set(result["skipped"]) == set(mods)
    assert "diptych.tui.app" in result["imported"] and "diptych.cli.main" in result["imported"]
