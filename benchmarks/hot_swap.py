"""Hot swap under load: a server on 127.0.0.1 following models:/NAME@production in a fresh MLflow
SQLite registry, RUN_A and RUN_B registered as versions 1 and 2, --clients clients streaming greedy
completions without pause. Measures (1) swap time: the alias move to the first reply served by the
new version (the move is followed by POST /admin/reload); (2) request latency p50/p99 (eos and
<|end|> biased away, so every reply is --tokens long whichever version writes it) over a window
without swaps, then over a window with --swaps swaps back and forth; (3) resident memory: before,
the peak while two versions are loaded, and after the old one is freed (sampled every 10 ms).

Usage: .venv/bin/python benchmarks/hot_swap.py RUN_A RUN_B [--clients 4] [--seconds 10] [--swaps 4]
One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn

from hybridlm.model import HybridLM
from hybridlm.registry.card import render_card
from hybridlm.registry.serving import AliasSource
from hybridlm.registry.store import Registry
from hybridlm.serve.app import create_app
from hybridlm.serve.auth import KeyStore, hash_key
from hybridlm.serve.config import load_serve_config
from hybridlm.tokenizer import TextTokenizer

ADMIN = "sk-bench-admin"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """Clients streaming one completion after another; each records (end time, seconds, version)."""

    def __init__(self, url: str, clients: int, tokens: int, never: list[int]) -> None:
        self.url, self.tokens, self.done, self.never = url, tokens, [], never
        self.failures, self._stop = 0, threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        body = json.dumps({"model": "bench", "prompt": "The module", "max_tokens": self.tokens, "temperature": 0,
                           "stream": True, "logit_bias": {str(t): -100 for t in self.never}}).encode()
        while not self._stop.is_set():
            started = time.perf_counter()
            request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as page:
                    text = page.read().decode()
                    version = page.headers["x-hybridlm-model-version"]
                ok = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            except OSError as exc:
                ok, version = False, ""
                print(f"request failed: {exc}", file=sys.stderr)
            self.failures += not ok
            self.done.append((time.perf_counter(), time.perf_counter() - started, version))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def latency(done: list, since: float, until: float) -> dict:
    seconds = sorted(s for end, s, _ in done if since <= end <= until)
    return {"requests": len(seconds), "p50_s": statistics.median(seconds),
            "p99_s": seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]}


def reload(url: str) -> dict:
    request = urllib.request.Request(f"{url}/admin/reload", data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=120) as page:
        return json.loads(page.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    store = Registry(f"sqlite:///{tmp / 'registry.db'}")
    for run in (args.run_a, args.run_b):
        store.register(run, "bench", render_card(run, "bench"))
    store.move("bench", "production", 1, "set")
    config = load_serve_config(None, ["server.alias_poll_s=0", "limits.requests_per_minute=0",
                                      "limits.tokens_per_minute=0", f'safety.review_db="{tmp / "review.sqlite"}"',
                                      f'audit.log="{tmp / "audit.jsonl"}"', "server.model_name=\"bench\""])
    memory = {"before_load": rss_mib()}
    app = create_app(AliasSource(store, "bench", "production"), config, KeyStore(frozenset()),
                     KeyStore(frozenset({hash_key(ADMIN)})))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    print(f"serving on {url}", file=sys.stderr)
    peak, sampling = [0.0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.01)

    tokenizer = TextTokenizer.load(args.run_a / "tokenizer.json")  # eos and <|end|> biased away: every reply is --tokens long
    load = Load(url, args.clients, args.tokens, [tokenizer.eos_id, tokenizer.special_ids["end"]])
    load.start()
    deadline = time.perf_counter() + 300
    while len(load.done) < 2 * args.clients and time.perf_counter() < deadline:  # warm-up (kernels load)
        time.sleep(0.1)
    memory["one_version_serving"] = rss_mib()
    quiet_start = time.perf_counter()
    time.sleep(args.seconds)
    quiet = latency(load.done, quiet_start, time.perf_counter())
    threading.Thread(target=sample, daemon=True).start()
    swaps, swap_start = [], time.perf_counter()
    for i in range(args.swaps):
        target = 2 if i % 2 == 0 else 1
        moved = time.perf_counter()
        store.move("bench", "production", target, "set")
        reload(url)
        while not any(end > moved and version == f"bench/{target}" for end, _, version in list(load.done)):
            time.sleep(0.005)
        first = min(end for end, _, version in list(load.done) if end > moved and version == f"bench/{target}")
        swaps.append(first - moved)
        time.sleep(args.seconds / args.swaps)
    swapping = latency(load.done, swap_start, time.perf_counter())
    load.stop()
    sampling.set()
    gc.collect()
    time.sleep(1.0)
    memory |= {"peak_during_swaps": peak[0], "after_swaps": rss_mib()}
    models_alive = sum(isinstance(o, HybridLM) for o in gc.get_objects())  # 1: every swapped-out version was freed
    server.should_exit = True
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "clients": args.clients,
                      "tokens": args.tokens, "failures": load.failures, "swap_to_first_reply_s": swaps,
                      "latency_without_swaps": quiet, "latency_with_swaps": swapping,
                      "p99_ratio": swapping["p99_s"] / quiet["p99_s"], "rss_mib": memory,
                      "models_alive_after": models_alive}, indent=2))


if __name__ == "__main__":
    main()
