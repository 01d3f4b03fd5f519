"""Models by name on the Hugging Face Hub: `org/repo[:QUANT]`, resolved to files in the
Hugging Face cache.

A GGUF repository: the file whose name holds QUANT as a word (case-insensitive; Q4_K_M when
no tag is given, else the first GGUF file, as llama.cpp's `-hf` does), or every part of a
split one (`...-00001-of-00003.gguf`). A repository without GGUF files but with config.json
and safetensors weights: the folder (config, weights, tokenizer files), loaded as a Hugging
Face folder source. huggingface_hub downloads into its cache (`HF_HOME`, `HF_HUB_CACHE`,
`HF_ENDPOINT` apply); a connection that drops mid-file resumes where it stopped (a Range
request), and a GGUF file that a stopped process left half-downloaded resumes in the next
one (hub_resume.py). Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable) the
repository's cached snapshot answers instead, so a model downloaded once loads without a
network.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from diptych.errors import HubError
from diptych.paths import models_dir
from .download_progress import download_bar, reporting_tqdm
from .gguf_split import part_names, split_part
from .hub_resume import fetch_blob
from .pypi_fetch import ProgressFn

DEFAULT_QUANT = "Q4_K_M"
# what a Hugging Face folder source reads (weights, config, tokenizer, chat template)
FOLDER_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<tag>[\w.-]+))?$")


@dataclass(frozen=True)
class HubRef:
    repo: str
    tag: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.tag}" if self.tag else "")


def parse_hub_id(source) -> HubRef | None:
    """`org/repo[:QUANT]` as a HubRef; None for anything else, and for a path that exists."""
    if not isinstance(source, str) or source.endswith(".gguf") or Path(source).exists():
        return None
    m = _HUB_ID.match(source)
    return HubRef(m["repo"], m["tag"]) if m else None


def local_path(source: str | Path, progress: ProgressFn | None = None) -> Path:
    """The local path of a model source: a Hub name downloaded (once); a bare file name
    that is not here but in diptych's model cache (a name `diptych list` shows) that file;
    else `source`."""
    ref = parse_hub_id(source)
    if ref is not None:
        return download(ref, progress)
    path = Path(source)
    if _bare(path) and not path.exists():
        cached = models_dir() / path.name
        if cached.is_file():
            return cached
    return path


def not_found(source: str | Path) -> str:
    """What to say of a model source that is not there."""
    if _bare(Path(source)):   # `local_path` looked among the downloads too
        return (f"{source}: no such file here or among the downloaded models "
                "(`diptych list` shows them)")
    return f"{source}: no such file"


def _bare(path: Path) -> bool:
    """A file name alone, without a folder."""
    return str(path) == path.name


# a quant name in a file name, and where a word ends ('Q4_K' is not in 'Q4_K_M')
_QUANT = re.compile(r"(?<![A-Za-z0-9])(?:I?Q\d(?:_[A-Z0-9]+)*|T?Q\d_\d|MXFP4|BF16|FP?16|FP?32)"
                    r"(?!_?[A-Za-z0-9])", re.IGNORECASE)


def gguf_quants(files: list[str]) -> list[str]:
    """The quant names in a repository's GGUF file names ('Q4_K_M', 'IQ4_XS', 'BF16', ...)."""
    return sorted({m.upper() for f in files if _is_model_gguf(f)
                   for m in _QUANT.findall(PurePosixPath(f).name)})


def choose_gguf(ref: HubRef, files: list[str]) -> list[str]:
    """The GGUF file(s) `ref` names among a repository's files: one file, or every part of
    a split model, in order. HubError (listing the quants there are) when none matches."""
    ggufs = sorted(f for f in files if _is_model_gguf(f))
    tag = ref.tag or DEFAULT_QUANT
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?!_?[A-Za-z0-9])", re.IGNORECASE)
    matches = [f for f in ggufs if word.search(f)]
    if not matches and ref.tag is None and ggufs:
        matches = ggufs[:1]
    if not matches:
        have = ", ".join(gguf_quants(files)) or "none"
        raise HubError(f"{ref.repo} has no GGUF file for quant {tag} (it has: {have})")
    first = matches[0]
    if (part := split_part(PurePosixPath(first).name)) is None:
        return [first]
    stem, _, count = part
    folder = PurePosixPath(first).parent
    names = [str(folder / n) if str(folder) != "." else n for n in part_names(stem, count)]
    if missing := [n for n in names if n not in files]:
        raise HubError(f"{ref.repo}: the split model {first} lacks parts {missing}")
    return names


def _is_model_gguf(name: str) -> bool:
    # projector files of vision models sit beside the language model's
    return name.endswith(".gguf") and "mmproj" not in PurePosixPath(name).name.lower()


def download(ref: HubRef, progress: ProgressFn | None = None) -> Path:
    """Download what `ref` names (or find it in the cache) and return its local path: the
    GGUF file (a split model's first part) or the model folder. `progress(done, total)`
    receives each file's bytes; without it, a progress bar per file is drawn on stderr."""
    files = _repo_files(ref)
    if any(f.endswith(".gguf") for f in files):
        paths = [_file(ref, name, progress) for name in choose_gguf(ref, files)]
        return paths[0]
    if ref.tag:
        raise HubError(f"{ref.repo} holds no GGUF files: a :QUANT tag names a GGUF file")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return _folder(ref, progress)
    raise HubError(f"{ref.repo} holds neither GGUF files nor a safetensors model "
                   "(config.json and *.safetensors)")


def _hub_errors():
    """huggingface_hub's error classes, and its HTTP client's network failure (httpx2,
    httpx or requests, depending on the huggingface_hub release)."""
    import importlib

    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    network: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    for client, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError")):
        try:
            network += (getattr(importlib.import_module(client), name),)
        except ImportError:
            continue
    return network, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _repo_files(ref: HubRef) -> list[str]:
    """The repository's files: listed by the hub, or, offline or with the hub unreachable,
    those of its cached snapshot."""
    from huggingface_hub import HfApi, constants

    network, HTTPError, _, NotFound = _hub_errors()
    if constants.HF_HUB_OFFLINE:
        return _cached_files(ref, "offline mode is on (HF_HUB_OFFLINE)")
    try:
        # one request (the tree listing retries a refused connection for half a minute)
        return [s.rfilename for s in HfApi().model_info(ref.repo).siblings or []]
    except NotFound:
        raise HubError(f"{ref.repo}: no such model repository on {_endpoint()} (or it is "
                       "private or gated: log in with `hf auth login` or set HF_TOKEN)"
                       ) from None
    except network as exc:  # OfflineModeIsEnabled is a ConnectionError
        return _cached_files(ref, f"the hub at {_endpoint()} is unreachable "
                                  f"({type(exc).__name__}: {exc})")
    except HTTPError as exc:
        return _cached_files(ref, f"the hub at {_endpoint()} answered {exc}")


def _cached_files(ref: HubRef, why: str) -> list[str]:
    """The files of the repository's cached `main` snapshot; HubError when none is cached."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir().repos
    except (CacheNotFound, ValueError, OSError):
        repos = frozenset()
    for repo in repos:
        if repo.repo_id == ref.repo and repo.repo_type == "model":
            for rev in repo.revisions:
                if "main" in rev.refs:
                    return sorted(f.file_path.relative_to(rev.snapshot_path).as_posix()
                                  for f in rev.files)
    raise HubError(f"cannot fetch {ref}: {why}, and it is not in the Hugging Face cache")


def _fetch(what: str, label: str, progress: ProgressFn | None, get) -> Path:
    """`get(tqdm_class)` downloads (or finds in the cache) and returns the local path; the
    hub's failures become a HubError naming `what`."""
    network, HTTPError, NotCached, _ = _hub_errors()
    bar = nullcontext(progress) if progress is not None else download_bar(label)
    with bar as report:
        try:
            return Path(get(reporting_tqdm(report)))
        except NotCached as exc:
            raise HubError(f"cannot fetch {what}: the hub at {_endpoint()} is unreachable or "
                           "offline mode is on, and it is not in the Hugging Face cache"
                           ) from exc
        except (HTTPError, OSError, *network) as exc:
            raise HubError(f"cannot download {what}: {exc}") from exc


def _file(ref: HubRef, name: str, progress: ProgressFn | None) -> Path:
    from huggingface_hub import hf_hub_download

    def get(tqdm_class):
        fetch_blob(ref.repo, name, tqdm_class)   # resumable across processes
        return hf_hub_download(ref.repo, name, tqdm_class=tqdm_class)
    return _fetch(f"{name} of {ref.repo}", PurePosixPath(name).name, progress, get)


def _folder(ref: HubRef, progress: ProgressFn | None) -> Path:
    from huggingface_hub import snapshot_download

    return _fetch(ref.repo, ref.repo, progress, lambda tqdm_class: snapshot_download(
        ref.repo, allow_patterns=FOLDER_FILES, tqdm_class=tqdm_class))
