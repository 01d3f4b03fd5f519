"""A small Hugging Face Hub on the loopback address, serving what huggingface_hub asks for:
repository info and file listings (`/api/models/...`), and files at
`/{repo}/resolve/{revision}/{path}` with HEAD and GET, Range requests, and the
ETag / X-Repo-Commit / Content-Length headers the client reads. Unknown repositories and
files answer 404 with the hub's X-Error-Code, so the client raises its own errors.

`drop_once[path] = n` makes the next full GET of that file send n bytes and close the
connection (an interrupted download); `stall[path] = n` makes each full GET of it send n
bytes and then wait, the connection open, until the hub stops (a download that a test
kills mid-file). `requests` records (method, path, Range) of each call, `sent` (path,
Range, bytes of the body written) of each file GET.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit



def commit(repo: str) -> str:
    """A repository's commit hash (each its own, as on the Hub)."""
    return hashlib.sha1(repo.encode()).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.drop_once: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.sent: list[tuple[str, str | None, int]] = []
        self.stopping = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    # -- answers ------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            files = self._repo(h, m[1])
            if files is not None:
                self._json(h, {"id": m[1], "sha": commit(m[1]),
                               "siblings": [{"rfilename": p} for p in files]}, body)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/(.*))?", path):
            files = self._repo(h, m[1])
            if files is not None:
                self._json(h, [{"type": "file", "path": p, "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest()}
                               for p, data in sorted(files.items())
                               if p.startswith(m[2] or "")], body)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            files = self._repo(h, m[1])
            if files is not None:
                self._file(h, m[2], files, body, commit(m[1]))
        else:
            self._error(h, 404, None)

    def _repo(self, h, repo: str) -> dict[str, bytes] | None:
        if repo not in self.repos:
            self._error(h, 404, "RepoNotFound")
            return None
        return self.repos[repo]

    def _error(self, h, status: int, code: str | None) -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _json(self, h, value, body: bool) -> None:
        data = json.dumps(value).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _file(self, h, name: str, files: dict[str, bytes], body: bool, sha: str) -> None:
        if name not in files:
            self._error(h, 404, "EntryNotFound")
            return
        data = files[name]
        start = 0
        if body and (r := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")):
            start = int(r[1])
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", sha)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self.drop_once.pop(name, None) if not start else None
        stall = self.stall.get(name) if not start else None
        if cut is not None or stall is not None:
            h.wfile.write(data[:cut if cut is not None else stall])
            h.wfile.flush()
            self.sent.append((name, None, cut if cut is not None else stall))
            if stall is not None:
                self.stopping.wait()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(data[start:])
        self.sent.append((name, h.headers.get("Range"), len(data) - start))
