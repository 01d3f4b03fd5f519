"""Hub downloads that a later process resumes.

huggingface_hub (2.x) downloads each file into a temporary name unique to the process and
deletes it when the download fails, so a process stopped mid-file (Ctrl+C, a kill, a
crash) leaves nothing to resume and the next one starts the file over. For the large files
(GGUF models), the blob is fetched here first, into `blobs/<etag>.incomplete` in the
Hugging Face cache, under huggingface_hub's own lock for that blob: a later process finds
the partial file and asks only for the rest (a Range request). The whole file's sha256 is
checked against the hub's ETag (the content hash of an LFS file) before the file becomes
the blob; huggingface_hub's `hf_hub_download` then finds the blob and links the snapshot
to it as it would after its own download.

Files stored with Xet (when hf_xet is installed) are left to huggingface_hub: hf_xet keeps
the chunks it fetched in its own cache across processes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from diptych.errors import HubError

from .cache_file import sha256_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def fetch_blob(repo: str, filename: str, tqdm_class=None) -> None:
    """Make sure the Hugging Face cache holds the blob of `filename` in `repo` (its main
    revision), resuming a partial download that an earlier process left."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    from .hub import _hub_errors

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo, filename), str):
        return
    network, HTTPError, _, _ = _hub_errors()
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename))
    except (HTTPError, *network):
        return   # hf_hub_download answers from the cache, or says why it cannot
    if meta.etag is None or (meta.xet_file_data is not None and _xet_used()):
        return
    folder = repo_folder_name(repo_id=repo, repo_type="model")
    blob = Path(constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():
            return
        part = Path(f"{blob}.incomplete")
        have = part.stat().st_size if part.exists() else 0
        if meta.size is not None and have > meta.size:
            have = 0
        with open(part, "r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            http_get(meta.location, f, resume_size=have, headers=build_hf_headers(),
                     expected_size=meta.size, displayed_filename=Path(filename).name,
                     tqdm_class=tqdm_class)
        if _SHA256.match(meta.etag) and sha256_file(part) != meta.etag:
            part.unlink()
            raise HubError(f"{filename} of {repo}: the downloaded bytes do not match the "
                           "hub's checksum; the partial file was removed, try again")
        os.replace(part, blob)


def _xet_used() -> bool:
    from importlib.util import find_spec

    from huggingface_hub import constants

    return find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET
