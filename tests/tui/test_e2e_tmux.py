"""`diptych chat` in a real terminal (tmux), from a fresh home: scripts/e2e_chat_tmux.sh."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "e2e_chat_tmux.sh"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_real_terminal(smollm2_path):
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable, "TIMEOUT": "120"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "e2e: ok" in out.stdout and "first reply token" in out.stdout
