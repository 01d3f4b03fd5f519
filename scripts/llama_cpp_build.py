#!/usr/bin/env python3
"""Build llama.cpp's command-line tools (llama-perplexity, llama-imatrix) from the source
distribution of the llama-cpp-python version installed, for the fixture scripts.

The sdist is fetched with pip (``pip download llama-cpp-python==VERSION --no-binary :all:
--no-deps``) and built with CMake into build/llama.cpp/ (ignored by git). The build targets
this CPU (GGML_NATIVE) without AMX: llama.cpp's AMX matmul path crashes on these CPUs
(llama.cpp #20824). Only the targets asked for are built. Later calls reuse the build.

    python scripts/llama_cpp_build.py [llama-perplexity llama-imatrix]
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "llama.cpp"
TARGETS = ("llama-perplexity", "llama-imatrix")


def _version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def source_dir() -> Path:
    """llama.cpp's source tree inside the sdist, downloaded and unpacked once."""
    ver = _version()
    src = BUILD / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}",
                    "--no-binary", ":all:", "--no-deps",
                    "-d", str(BUILD)], check=True)
    sdist = next(BUILD.glob(f"llama_cpp_python-{ver}.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(BUILD, filter="data")
    return src


def tool(name: str) -> Path:
    """The path of llama.cpp's tool `name` (e.g. "llama-perplexity"), built if missing."""
    out = BUILD / "out"
    exe = out / "bin" / name
    if exe.is_file():
        return exe
    src = source_dir()
    if not (out / "CMakeCache.txt").is_file():
        subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(out), "--target", name, "-j2"], check=True)
    return exe


def main() -> None:
    for name in sys.argv[1:] or TARGETS:
        print(tool(name))


if __name__ == "__main__":
    main()
