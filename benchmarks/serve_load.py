"""Serving under load: continuous batching vs one request at a time, and the safety filter's cost.

The server runs as `hybridlm serve` in a subprocess on 127.0.0.1 (loopback only), once with
`server.max_batch=32` (continuous batching) and once with `server.max_batch=1` (sequential: the
same engine, one sequence at a time). Against each, 1, 8 and 32 concurrent clients (asyncio +
httpx) send streamed chat completions (temperature 0, a fixed max_tokens) with realistic prompts:
the first Human turn of each hh-rlhf harmless-base dialogue, red-team questions mostly. Per level:
requests/s, completion tokens/s, p50/p99 end-to-end latency and time to first token (the first
server-sent event: the server sends it once the first token is generated), then the ratio
batched / sequential. A level has a fixed total of requests shared by its clients (at least one
each), so concurrency 1 still has enough samples for a p99 and concurrency 32 stays bounded.

The safety filter (the built-in rule chain a default server runs) is measured three ways:
directly, over ~2,000 prompts (the prompt check, plus the streamed-output guard fed the dialogue's
first Assistant turn in 4-character pieces, as the server feeds it tokens); inside the server (its
`hybridlm_safety_filter_seconds` histogram); and as the latency difference between the batched
server at concurrency 1 with the filter on and off (noisy: model time varies more than the filter
costs). The issue's budget is p99 under 5 ms per request.

Usage: .venv/bin/python benchmarks/serve_load.py RUN_DIR [--quick] [--out FILE]
(RUN_DIR: any run, e.g. runs/quickstart/run/3-instruct). One JSON document goes to stdout (and to
--out); progress goes to stderr. A full run takes a few minutes on a 2-core CPU; --quick ~1 minute.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import httpx2 as httpx  # the [bench] extra declares it (the HTTP client the openai package uses)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RLHF = SHARED_DATA / "preference" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
BUDGET_MS = 5.0
WARM_UP = 4
"""Requests sent one at a time before each level is measured (prompts the level does not use)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- prompts -------------------------------------------------------------------------------------

def dialogues(path: Path) -> list[tuple[str, str]]:
    """(first Human turn, first Assistant turn) of each `chosen` dialogue."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            chosen = json.loads(line)["chosen"]
            human = chosen.split("Human:", 1)[-1]
            prompt, _, rest = human.partition("\n\nAssistant:")
            reply = rest.split("\n\nHuman:", 1)[0]
            if prompt.strip():
                pairs.append((prompt.strip(), reply.strip()))
    return pairs


# ---- statistics ----------------------------------------------------------------------------------

def spread(values: list[float], scale: float = 1.0, digits: int = 4) -> dict:
    """p50 / p99 / mean / max of `values` times `scale`."""
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    array = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(array, 50)), digits),
            "p99": round(float(np.percentile(array, 99)), digits),
            "mean": round(float(array.mean()), digits), "max": round(float(array.max()), digits)}


# ---- the safety filter, called directly ----------------------------------------------------------

def filter_overhead(pairs: list[tuple[str, str]], piece_chars: int = 4) -> dict:
    """Per-request time of the default chain: prompt check + streamed-output guard, in ms."""
    from hybridlm.serve.config import ServeConfig
    from hybridlm.serve.safety import build_chain

    settings = ServeConfig().safety
    chain = build_chain(settings.rules, builtin=settings.builtin_rules, hold_chars=settings.hold_chars)

    def one(prompt: str, reply: str) -> tuple[float, float, int]:
        started = time.perf_counter()
        hits = len(chain.check(prompt, "prompt").hits)
        checked = time.perf_counter()
        guard = chain.guard()
        for start in range(0, len(reply), piece_chars):
            guard.feed(reply[start : start + piece_chars])
        guard.finish()
        return checked - started, time.perf_counter() - checked, hits + len(guard.new_hits)

    for prompt, reply in pairs[:200]:  # warm-up: regex caches, allocator
        one(prompt, reply)
    prompt_s, output_s, hits = [], [], 0
    for prompt, reply in pairs:
        p, o, h = one(prompt, reply)
        prompt_s.append(p)
        output_s.append(o)
        hits += h
    total = [p + o for p, o in zip(prompt_s, output_s, strict=True)]
    return {"requests": len(pairs), "hits": hits, "rules": sum(len(getattr(f, "rules", ())) for f in chain.filters),
            "prompt_chars_mean": round(sum(len(p) for p, _ in pairs) / len(pairs), 1),
            "output_chars_mean": round(sum(len(r) for _, r in pairs) / len(pairs), 1),
            "prompt_ms": spread(prompt_s, 1e3), "output_ms": spread(output_s, 1e3),
            "per_request_ms": spread(total, 1e3),
            "budget_ms": BUDGET_MS, "p99_within_budget": bool(np.percentile(total, 99) * 1e3 < BUDGET_MS)}


# ---- the server ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`hybridlm serve` in a subprocess on 127.0.0.1 (see `serving` for its lifetime)."""

    def __init__(self, run: Path, workdir: Path, name: str, overrides: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        args = [sys.executable, "-m", "hybridlm", "serve", "--model", str(run), "--host", "127.0.0.1",
                "--port", str(self.port), "limits.requests_per_minute=0", "limits.tokens_per_minute=0",
                f'audit.log="{workdir / (name + ".audit.jsonl")}"',
                f'safety.review_db="{workdir / (name + ".review.sqlite")}"',
                *overrides]
        env = {k: v for k, v in os.environ.items() if k != "HYBRIDLM_API_KEYS"}  # no keys: nothing to send
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s:\n{self.log.read_text()[-2000:]}")

    def model(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def filter_seconds(self) -> dict:
        """The server's own safety filter timing: its histogram's count, mean, and the bucket holding p99."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        buckets, total, count = [], 0.0, 0.0
        for line in text.splitlines():
            if line.startswith("hybridlm_safety_filter_seconds_bucket"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((math.inf if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
            elif line.startswith("hybridlm_safety_filter_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("hybridlm_safety_filter_seconds_count"):
                count = float(line.rsplit(" ", 1)[1])
        p99 = next((b for b, c in sorted(buckets) if count and c >= 0.99 * count), None)
        return {"requests": int(count), "mean_ms": round(total / count * 1e3, 4) if count else None,
                "p99_at_most_ms": None if p99 is None else (p99 * 1e3 if p99 != math.inf else "inf")}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serving(run: Path, workdir: Path, name: str, overrides: list[str]) -> Iterator[Server]:
    """A ready server for the block; stopped (SIGTERM, then kill) however the block ends."""
    server = Server(run, workdir, name, overrides)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ---- the clients ---------------------------------------------------------------------------------

@dataclass
class Sample:
    status: int
    latency_s: float
    ttft_s: float | None
    tokens: int


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    """One streamed chat completion: time to the first event, to [DONE], and the token count."""
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Sample(response.status_code, time.perf_counter() - started, None, 0)
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            first = first if first is not None else time.perf_counter() - started
            data = line[5:].strip()
            if data == "[DONE]":
                break
            usage = json.loads(data).get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    return Sample(200, time.perf_counter() - started, first, tokens)


async def load_level(url: str, model: str, prompts: list[str], clients: int, total: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending its share of `total` requests one after another."""
    per_client = max(1, math.ceil(total / clients))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client_loop(client: httpx.AsyncClient, index: int) -> list[Sample]:
        samples = []
        for j in range(per_client):
            prompt = prompts[(index * per_client + j) % len(prompts)]
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            samples.append(await one_request(client, url, body))
        return samples

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for prompt in prompts[-WARM_UP:]:  # the first requests after a start pay for lazy set-up
            await one_request(client, url, {"model": model, "messages": [{"role": "user", "content": prompt}],
                                            "max_tokens": max_tokens, "temperature": 0, "stream": True})
        started = time.perf_counter()
        results = await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        wall = time.perf_counter() - started
    samples = [s for batch in results for s in batch]
    ok = [s for s in samples if s.status == 200]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    tokens = sum(s.tokens for s in ok)
    return {"concurrency": clients, "requests": len(samples), "requests_per_client": per_client, "statuses": statuses,
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "completion_tokens": tokens, "latency_s": spread([s.latency_s for s in ok]),
            "ttft_s": spread([s.ttft_s for s in ok if s.ttft_s is not None])}


def serve_and_load(run: Path, workdir: Path, name: str, overrides: list[str], prompts: list[str],
                   levels: list[int], total: int, max_tokens: int) -> dict:
    say(f"[{name}] starting the server ({' '.join(overrides)})")
    with serving(run, workdir, name, overrides) as server:
        model = server.model()
        out = {"overrides": overrides, "levels": []}
        for clients in levels:
            say(f"[{name}] {clients} concurrent client(s)")
            level = asyncio.run(load_level(server.url, model, prompts, clients, total, max_tokens))
            say(f"[{name}]   {level['requests_per_s']} req/s, {level['tokens_per_s']} tok/s, "
                f"p50 {level['latency_s']['p50']} s, p99 {level['latency_s']['p99']} s")
            out["levels"].append(level)
        out["safety_filter_in_server"] = server.filter_seconds()
    return out


def ratios(batched: dict, sequential: dict) -> list[dict]:
    pairs = zip(batched["levels"], sequential["levels"], strict=True)
    return [{"concurrency": b["concurrency"],
             "requests_per_s": round(b["requests_per_s"] / s["requests_per_s"], 3) if s["requests_per_s"] else None,
             "tokens_per_s": round(b["tokens_per_s"] / s["tokens_per_s"], 3) if s["tokens_per_s"] else None}
            for b, s in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory to serve (e.g. runs/quickstart/run/3-instruct)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute sanity run (fewer requests and tokens)")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="requests per level, shared by its clients "
                        "(default 128; --quick 8, and at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 64; --quick 16)")
    parser.add_argument("--safety-prompts", type=int, default=None, help="prompts for the direct filter timing "
                        "(default all, ~2,300; --quick 500)")
    parser.add_argument("--prompts", type=Path, default=HH_RLHF, help="hh-rlhf JSONL.gz with `chosen` dialogues")
    parser.add_argument("--no-on-off", action="store_true", help="skip the filter on/off server comparison")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args()
    if not (args.run / "config.json").exists():
        parser.error(f"{args.run} is not a run directory (no config.json)")
    if not args.prompts.exists():
        parser.error(f"{args.prompts} is missing: the hh-rlhf prompts sit in ../shared/data beside the checkout")
    levels = [int(c) for c in args.concurrency.split(",")]
    total = args.requests or (8 if args.quick else 128)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    pairs = dialogues(args.prompts)
    prompts = [p for p, _ in pairs]
    started = time.perf_counter()

    sample = pairs[: args.safety_prompts or (500 if args.quick else None)]
    say(f"safety filter, called directly on {len(sample)} prompts")
    direct = filter_overhead(sample)
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        workdir = Path(tmp)
        batched = serve_and_load(args.run, workdir, "batched", ["server.max_batch=32", "server.max_queue=256",
                                 f"server.max_tokens_cap={max_tokens}"], prompts, levels, total, max_tokens)
        sequential = serve_and_load(args.run, workdir, "sequential", ["server.max_batch=1", "server.max_queue=256",
                                    f"server.max_tokens_cap={max_tokens}"], prompts, levels, total, max_tokens)
        on_off = None
        if not args.no_on_off and 1 in levels:
            off = serve_and_load(args.run, workdir, "batched, filter off", [
                "server.max_batch=32", "server.max_queue=256", f"server.max_tokens_cap={max_tokens}",
                "safety.enabled=false"], prompts, [1], total, max_tokens)["levels"][0]
            on = batched["levels"][levels.index(1)]
            on_off = {"concurrency": 1, "requests": off["requests"],
                      "latency_p50_s": {"on": on["latency_s"]["p50"], "off": off["latency_s"]["p50"]},
                      "latency_p50_difference_ms": round((on["latency_s"]["p50"] - off["latency_s"]["p50"]) * 1e3, 3),
                      "note": "end-to-end model time varies by more than the filter costs; see safety_filter.direct"}
    doc = {
        "benchmark": "serve_load", "quick": args.quick, "run": str(args.run),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"concurrency": levels, "requests_per_level": total, "max_tokens": max_tokens, "temperature": 0,
                     "stream": True, "prompts": f"{args.prompts.name}: first Human turn of {len(prompts)} dialogues"},
        "batched": {"max_batch": 32, **batched}, "sequential": {"max_batch": 1, **sequential},
        "throughput_ratio_batched_over_sequential": ratios(batched, sequential),
        "safety_filter": {"direct": direct, "in_server_batched": batched["safety_filter_in_server"],
                          "in_server_sequential": sequential["safety_filter_in_server"], "server_on_minus_off": on_off},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
