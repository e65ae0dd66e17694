#!/usr/bin/env python3
"""Load test for `finetune serve`: N concurrent clients x M chat requests; prints successes, failures, latencies.

    python scripts/load_test.py                       # starts a server on the embedded model, 8 clients x 50
    python scripts/load_test.py --url http://127.0.0.1:8765 --api-key KEY   # an already running server
    python scripts/load_test.py --gguf runs/quickstart/export/quickstart-Q8_0.gguf --workers 2

How the server is meant to take this: requests beyond what the workers can generate at once wait in a queue
(FIFO); only requests beyond serve.max_concurrent (admitted = generating + queued; default 16) get HTTP 429. So
8 clients against the default server see no failures; they see latency grow with the queue instead. A client
that gets a 429 anyway is counted as a failure here (the target is 0). Latency is per request, end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

PROMPTS = [
    "Say hello in one short sentence.",
    "Name a colour.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "Write one short sentence about the sea.",
]


def one_request(url: str, api_key: str | None, prompt: str, max_tokens: int) -> tuple[int, float, int]:
    """(HTTP status or 0 for a connection error, seconds, completion tokens)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0.7}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            data = json.loads(r.read())
            return r.status, time.perf_counter() - t0, data["usage"]["completion_tokens"]
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, time.perf_counter() - t0, 0
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, time.perf_counter() - t0, 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_load(url: str, *, clients: int, requests: int, max_tokens: int, api_key: str | None = None) -> dict[str, Any]:
    results: list[tuple[int, float, int]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(requests):
            outcome = one_request(url, api_key, PROMPTS[(index + i) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(outcome)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200]
    latencies = [r[1] for r in ok]
    tokens = sum(r[2] for r in ok)
    return {
        "clients": clients, "requests": len(results), "successes": len(ok), "failures": len(results) - len(ok),
        "failure_status": dict(Counter(r[0] for r in results if r[0] != 200)),
        "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3) if latencies else None, "wall_s": round(wall, 1),
        "requests_per_s": round(len(ok) / wall, 2), "completion_tokens_per_s": round(tokens / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--api-key", help="the server's API key")
    p.add_argument("--gguf", help="model to serve when starting a server (default: the embedded model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=8, help="answer length per request (small: measures the server)")
    p.add_argument("--workers", type=int, default=1, help="serve.workers for a started server")
    p.add_argument("--max-concurrent", type=int, default=16, help="serve.max_concurrent for a started server")
    p.add_argument("--threads", type=int, help="serve.threads for a started server")
    p.add_argument("--json", help="also write the result to this file")
    ns = p.parse_args(argv)

    if ns.url:
        result = run_load(ns.url.rstrip("/"), clients=ns.clients, requests=ns.requests, max_tokens=ns.max_tokens,
                          api_key=ns.api_key)
    else:
        from finetune.models import embedded_gguf_path
        from serve.launch import ServerProcess

        gguf = ns.gguf or str(embedded_gguf_path())
        overrides = [f"serve.workers={ns.workers}", f"serve.max_concurrent={ns.max_concurrent}", "serve.n_ctx=512",
                     "serve.log_conversations=false"]
        if ns.threads:
            overrides.append(f"serve.threads={ns.threads}")
        import tempfile

        with tempfile.TemporaryDirectory() as store, ServerProcess(gguf, overrides, store=store) as server:
            print(f"started {server.url} serving {Path(gguf).name} ({' '.join(overrides)})", flush=True)
            result = run_load(server.url, clients=ns.clients, requests=ns.requests, max_tokens=ns.max_tokens)
            result["server"] = {k: v for k, v in server.health().items() if k in ("served", "failed", "workers")}
    print(f"{result['clients']} clients x {ns.requests} requests (max_tokens={ns.max_tokens}) in {result['wall_s']} s")
    print(f"  successes: {result['successes']}   failures: {result['failures']} {result['failure_status'] or ''}")
    print(f"  latency:   p50 {result['p50_s']} s   p95 {result['p95_s']} s   max {result['max_s']} s")
    print(f"  throughput: {result['requests_per_s']} requests/s, {result['completion_tokens_per_s']} tokens/s")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
