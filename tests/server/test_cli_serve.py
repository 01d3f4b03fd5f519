"""`diptych serve` refusals at start: one line on stderr, exit 1, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diptych.cli", "serve", *args],
                          capture_output=True, text=True, timeout=300)


def test_more_slots_than_memory_holds_are_refused_before_allocating(smollm2_path):
    done = serve(str(smollm2_path), "--n-ctx", "8192", "--parallel", "1000000", "--port", "0")
    assert done.returncode == 1
    assert "smaller --parallel" in done.stderr and "Traceback" not in done.stderr


def test_a_port_in_use_is_an_error(smollm2_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(str(smollm2_path), "--port", str(port))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stdout
