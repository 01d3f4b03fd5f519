"""`diptych serve` in a subprocess on a free loopback port, for the tests to talk to."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

API_KEY = "test-key"


class ServerProcess:
    """A running `diptych serve`; `base` is its http://127.0.0.1:PORT/v1."""

    def __init__(self, model_path, *options: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("DIPTYCH_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diptych.cli", "serve", str(model_path), "--host",
             "127.0.0.1", "--port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.banner = []
        for line in self.proc.stdout:   # the server announces its URL once it listens
            self.banner.append(line)
            if line.startswith("try: curl"):
                break
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", "".join(self.banner))
        if not found:
            self.close()
            raise RuntimeError("the server did not start:\n" + "".join(self.stderr))
        self.base = found.group(1)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def smol_server(smollm2_path):
    """SmolLM2 with 4 slots and an API key."""
    server = ServerProcess(smollm2_path, "--n-ctx", "1024", "--parallel", "4", "--api-key",
                           API_KEY)
    yield server
    server.close()


class InWorker:
    """A model whose calls run in one worker thread (a generator's pieces come back as a
    list): the torch CPU backend decodes many times faster there than in the main thread
    (BENCHMARKS.md, the `diptych serve` section)."""

    def __init__(self, model):
        self._model, self._pool = model, ThreadPoolExecutor(1)

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            def run():
                out = attr(*args, **kwargs)
                return list(out) if isinstance(out, Iterator) else out
            return self._pool.submit(run).result()
        return call


@pytest.fixture(scope="session")
def smol_model(smollm2_path):
    """The same model in-process: the reference the server's answers must equal."""
    import diptych

    return InWorker(diptych.load(smollm2_path, n_ctx=1024))


class Raw:
    """Plain HTTP/1.1 (http.client) to a server, with the bytes as given."""

    def __init__(self, base: str, key: str | None = API_KEY):
        url = urlsplit(base)
        self.host, self.port, self.prefix, self.key = url.hostname, url.port, url.path, key

    def open(self, method: str, path: str, body=None, headers: dict | None = None,
             prefix: bool = True):
        """Send a request; returns (connection, response) with the body unread. A dict body
        is sent as JSON, bytes as they are."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        head = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if isinstance(body, dict):
            body, head["Content-Type"] = json.dumps(body).encode(), "application/json"
        head.update(headers or {})
        conn.request(method, (self.prefix if prefix else "") + path, body=body, headers=head)
        return conn, conn.getresponse()

    def call(self, method: str, path: str, body=None, **kw) -> tuple[int, object]:
        """(status, the JSON body)."""
        conn, response = self.open(method, path, body, **kw)
        try:
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def post(self, path: str, body) -> dict:
        status, reply = self.call("POST", path, body)
        assert status == 200, reply
        return reply

    def health(self) -> dict:
        return self.call("GET", "/health", prefix=False)[1]

    def events(self, path: str, body: dict) -> list:
        """The JSON objects of a streamed reply; the stream must end with `data: [DONE]`."""
        conn, response = self.open("POST", path, body)
        try:
            assert response.status == 200
            assert response.getheader("content-type").startswith("text/event-stream")
            lines = [line.decode().rstrip("\n") for line in response if line.strip()]
        finally:
            conn.close()
        assert lines[-1] == "data: [DONE]"
        assert all(line.startswith("data: ") for line in lines)
        return [json.loads(line[6:]) for line in lines[:-1]]
