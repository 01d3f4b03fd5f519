"""Models by name from the Hugging Face Hub, against a Hub-compatible server on the loopback
address (tests/hub_server.py): huggingface_hub's real download code lists the repository,
fetches with HEAD and GET, resumes an interrupted file with a Range request, and works
offline from its cache afterwards. Each download runs in a child process started with
HF_ENDPOINT and HF_HOME set, as a user's would be (huggingface_hub reads them at import)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from diptych.errors import HubError, ModelFileError
from diptych.quant.gguf_file import GGUFFile
from diptych.quant.gguf_write import _add_value
from diptych.sources.hf_folder import open_source
from diptych.sources.hub import HubRef, choose_gguf, local_path, parse_hub_id

from ..hub_server import FakeHub, commit
from ..tiny_models import tiny_hf_model, write_gguf

IDS = [1, 5, 9, 2, 7, 3, 11, 4]


# -- choosing the file ---------------------------------------------------------------------
REPO = ["README.md", "m-Q4_K_S.gguf", "m-Q4_K_M.gguf", "m-q8_0.gguf", "m-IQ4_XS.gguf",
        "mmproj-m-Q4_K_M.gguf", "BF16/m-BF16-00001-of-00002.gguf",
        "BF16/m-BF16-00002-of-00002.gguf"]


@pytest.mark.parametrize("tag, files", [
    (None, ["m-Q4_K_M.gguf"]),                      # llama.cpp's default quant
    ("Q4_K_S", ["m-Q4_K_S.gguf"]),
    ("Q8_0", ["m-q8_0.gguf"]),                      # case-insensitive
    ("bf16", ["BF16/m-BF16-00001-of-00002.gguf", "BF16/m-BF16-00002-of-00002.gguf"]),
])
def test_a_tag_names_the_file_as_a_word(tag, files):
    assert choose_gguf(HubRef("org/m-GGUF", tag), REPO) == files


def test_without_the_default_quant_the_first_file_and_a_missing_tag_lists_the_quants():
    assert choose_gguf(HubRef("org/m"), ["b-Q8_0.gguf", "a-F16.gguf"]) == ["a-F16.gguf"]
    with pytest.raises(HubError, match=r"no GGUF file for quant Q4_K .*BF16, IQ4_XS, Q4_K_M, "
                                       r"Q4_K_S, Q8_0\)"):
        choose_gguf(HubRef("org/m-GGUF", "Q4_K"), REPO)   # Q4_K_M does not count as Q4_K
    with pytest.raises(HubError, match="lacks parts"):
        choose_gguf(HubRef("org/m-GGUF", "BF16"), REPO[:-1])


def test_hub_names_and_paths(tmp_path):
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M") == HubRef(
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M")
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M") == HubRef("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "org" / "repo").mkdir(parents=True)
    for local in ("models/m.gguf", "m.gguf", "/abs/org/repo", "a/b/c", "one", "a b/c",
                  str(tmp_path / "org" / "repo")):
        assert parse_hub_id(local) is None, local



def test_a_bare_file_name_finds_a_download_unless_it_is_here(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    downloads = tmp_path / "cache" / "models"
    downloads.mkdir(parents=True)
    (downloads / "m.gguf").write_bytes(b"GGUF")
    assert local_path("m.gguf") == downloads / "m.gguf"     # what `diptych list` names
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert local_path("m.gguf") == Path("m.gguf")            # a file here comes first
    assert local_path("sub/n.gguf") == Path("sub/n.gguf")    # a path is taken as it is
    with pytest.raises(ModelFileError, match=r"n.gguf: no such file here or among the "
                       r"downloaded models \(`diptych list` shows them\)"):
        open_source(local_path("n.gguf"))
    with pytest.raises(ModelFileError, match=r"sub/n.gguf: no such file$"):
        open_source(local_path("sub/n.gguf"))


# -- downloads from the loopback hub ---------------------------------------------------
def write_split(src, stem, per_part: int) -> list:
    """`src` rewritten as a split GGUF model (gguf-py's writer, as llama.cpp's gguf-split)."""
    f = GGUFFile(src)
    stem.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(f"{stem}.gguf", f.metadata["general.architecture"],
                        split_max_tensors=per_part)
    for key, value in f.metadata.items():
        if key != "general.architecture":
            _add_value(w, key, value)
    for name, t in f.tensors.items():
        w.add_tensor(name, np.asarray(t.data).reshape(*t.shape[:-1], -1), raw_dtype=t.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(stem.parent.glob(f"{stem.name}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    single = write_gguf(tiny_hf_model("llama", seed=3), "llama", root / "tiny-Q8_0.gguf", "Q8_0")
    parts = write_split(single, root / "split" / "tiny-Q8_0", per_part=8)
    assert len(parts) > 1
    folder = single.with_suffix(".hf")
    return {
        "paths": {"gguf": single, "folder": folder},
        "org/tiny-GGUF": {"README.md": b"# tiny\n", "tiny-Q8_0.gguf": single.read_bytes()},
        "org/split-GGUF": {f"Q8_0/{p.name}": p.read_bytes() for p in parts},
        "org/tiny": {p.name: p.read_bytes() for p in folder.iterdir()},
    }


@pytest.fixture
def hub(repos):
    with FakeHub({k: v for k, v in repos.items() if "/" in k}) as server:
        yield server


def child(code: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, **kw)


DOWNLOAD = """
    import json
    from huggingface_hub import constants
    from diptych.errors import DiptychError
    from diptych.sources.hub import download, parse_hub_id
    # huggingface_hub keeps what it read of a dropped connection in whole chunks (10 MB):
    # small ones, so that a small file's interrupted download resumes past its start
    constants.DOWNLOAD_CHUNK_SIZE = 4096
    for name in NAMES:
        seen = []
        try:
            path = download(parse_hub_id(name), lambda done, total: seen.append((done, total)))
            print(json.dumps({"path": str(path), "last": seen[-1] if seen else None}))
        except DiptychError as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def fetch(env: dict, *names: str) -> list[dict]:
    """download() of each name in one child process: {"path", "last" progress} or {"error"}."""
    out = child(DOWNLOAD.replace("NAMES", repr(list(names))), env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(names):]]


def hub_env(hub, tmp_path, **more) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "DIPTYCH_CACHE": str(tmp_path / "diptych"), **more}


def test_download_by_quant_resumes_then_works_offline(hub, repos, tmp_path):
    env = hub_env(hub, tmp_path)
    data = repos["org/tiny-GGUF"]["tiny-Q8_0.gguf"]
    hub.drop_once["tiny-Q8_0.gguf"] = len(data) // 3
    got, no_repo, no_quant = fetch(env, "org/tiny-GGUF:q8_0", "org/none", "org/tiny-GGUF:Q4_0")
    assert open(got["path"], "rb").read() == data
    assert got["last"] == [len(data), len(data)]     # the progress reached the whole file
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("tiny-Q8_0.gguf")]
    assert len(ranges) == 2 and ranges[0] is None       # the second asked for the rest only
    assert 0 < int(ranges[1].removeprefix("bytes=").removesuffix("-")) <= len(data) // 3
    assert no_repo["error"].startswith(f"HubError: org/none: no such model repository on "
                                       f"{hub.url}")
    assert no_quant["error"] == ("HubError: org/tiny-GGUF has no GGUF file for quant Q4_0 "
                                 "(it has: Q8_0)")
    # offline, the cached file answers and nothing is asked of the hub
    hub.requests.clear()
    assert fetch({**env, "HF_HUB_OFFLINE": "1"}, "org/tiny-GGUF:Q8_0")[0]["path"] == got["path"]
    assert hub.requests == []
    # the hub gone: the cache answers; what is not cached fails with a clear message
    hub.__exit__()
    cached, missing = fetch(env, "org/tiny-GGUF:Q8_0", "org/tiny")
    assert cached["path"] == got["path"]
    assert missing["error"].startswith(f"HubError: cannot fetch org/tiny: the hub at {hub.url} "
                                       "is unreachable")
    assert missing["error"].endswith("and it is not in the Hugging Face cache")


def test_a_download_killed_mid_file_resumes_in_the_next_process(hub, repos, tmp_path):
    """A child process downloading a GGUF file is killed (SIGKILL) mid-file; the next
    process asks only for the rest (Range) and the file's sha256 is the hub's."""
    env = hub_env(hub, tmp_path)
    data = repos["org/tiny-GGUF"]["tiny-Q8_0.gguf"]
    half = len(data) // 2
    hub.stall["tiny-Q8_0.gguf"] = half
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(
        DOWNLOAD.replace("NAMES", repr(["org/tiny-GGUF:Q8_0"])))], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blobs = tmp_path / "hf" / "hub" / "models--org--tiny-GGUF" / "blobs"
    deadline = time.monotonic() + 120
    while not [p for p in blobs.glob("*.incomplete") if p.stat().st_size >= half - 8192]:
        assert proc.poll() is None and time.monotonic() < deadline, "no partial file came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept <= half
    del hub.stall["tiny-Q8_0.gguf"]
    hub.sent.clear()
    got = fetch(env, "org/tiny-GGUF:Q8_0")[0]
    assert hashlib.sha256(open(got["path"], "rb").read()).digest() \
        == hashlib.sha256(data).digest()
    assert hub.sent == [("tiny-Q8_0.gguf", f"bytes={kept}-", len(data) - kept)]
    assert not list(blobs.glob("*.incomplete"))


def test_a_model_by_name_runs_like_its_file(hub, repos, tmp_path):
    """`diptych run org/repo:QUANT` of a split repository downloads its parts (with a bar
    each) and writes the single local file's greedy text; `list` and `rm` see and delete
    downloads."""
    import diptych

    env = hub_env(hub, tmp_path)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "diptych.cli", *args], capture_output=True,
                             text=True, timeout=300, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        return out

    local = diptych.load(repos["paths"]["gguf"], backend="torch", device="cpu", n_ctx=64)
    text = local.generate("hello world", 6, temperature=0)
    out = cli("run", "org/split-GGUF:Q8_0", "hello world", "--raw", "--max-tokens", "6",
              "--temperature", "0", "--backend", "torch", "--device", "cpu")
    assert out.stdout == text + "\n"
    for part in range(1, 4):
        assert f"downloading tiny-Q8_0-0000{part}-of-00003.gguf" in out.stderr
    fetch(env, "org/tiny-GGUF:Q8_0")
    listed = cli("list").stdout
    assert "org/split-GGUF" in listed and "tiny-Q8_0-00003-of-00003.gguf" in listed
    assert "org/tiny-GGUF" in listed
    assert "removed org/split-GGUF" in cli("rm", "org/split-GGUF").stdout
    hub_cache = tmp_path / "hf" / "hub"
    assert not (hub_cache / "models--org--split-GGUF").exists()
    assert (hub_cache / "models--org--tiny-GGUF").exists()


def test_a_safetensors_repository_downloads_its_folder(hub, repos, tmp_path):
    """`diptych quantize org/repo` of a safetensors model: it downloads the folder, which
    loads like the local one, and writes the local folder's file."""
    import diptych

    out = subprocess.run([sys.executable, "-m", "diptych.cli", "quantize", "org/tiny",
                          str(tmp_path / "hub.gguf"), "--type", "Q8_0"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **hub_env(hub, tmp_path)})
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit("org/tiny")
    assert sorted(os.listdir(folder)) == sorted(repos["org/tiny"])
    kw = dict(backend="torch", device="cpu", n_ctx=32)
    np.testing.assert_array_equal(diptych.load(folder, **kw).logits(IDS),
                                  diptych.load(repos["paths"]["folder"], **kw).logits(IDS))
    local = diptych.quantize(repos["paths"]["folder"], tmp_path / "local.gguf", "Q8_0")
    ours, theirs = GGUFFile(tmp_path / "hub.gguf"), GGUFFile(local)
    assert list(ours.tensors) == list(theirs.tensors)
    for name, t in ours.tensors.items():
        np.testing.assert_array_equal(t.data, theirs.tensors[name].data)


def test_list_and_rm_cover_diptychs_own_cache(tmp_path, monkeypatch):
    from diptych.errors import InvalidArgumentError
    from diptych.sources.model_cache import cached_models, remove
    from diptych.sources.pypi_models import MODELS

    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path / "diptych"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # none there
    models = tmp_path / "diptych" / "models"
    models.mkdir(parents=True)
    name = MODELS["gemma-3-270m"].filename
    for f in (name, name + ".sha256", name + ".lock", "mine.gguf"):
        (models / f).write_bytes(b"GGUF" + bytes(60))
    assert [(m.name, m.where, m.size) for m in cached_models()] == [
        (name, "diptych", 64), ("mine.gguf", "diptych", 64)]
    assert remove("gemma-3-270m") == [models / name]     # by its PyPI model name
    assert sorted(p.name for p in models.iterdir()) == ["mine.gguf"]
    with pytest.raises(InvalidArgumentError, match=r"downloaded: mine.gguf"):
        remove("org/none")
    with pytest.raises(InvalidArgumentError, match="without the :QUANT tag"):
        remove("org/repo:Q4_K_M")
    # repositories at the same commit hash (mirrors of one repository): rm takes one only
    for repo in "abcdef":
        folder = tmp_path / "hf" / f"models--org--{repo}"
        (folder / "blobs").mkdir(parents=True)
        (folder / "blobs" / "0f").write_bytes(b"GGUF")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("c" * 40)
        (folder / "snapshots" / ("c" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("c" * 40) / "m-Q8_0.gguf").symlink_to("../../blobs/0f")
    remove("org/d")
    assert [m.name for m in cached_models()] == [*(f"org/{r}" for r in "abcef"), "mine.gguf"]
