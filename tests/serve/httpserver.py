"""Helpers for the HTTP tests: a real uvicorn server on a free 127.0.0.1 port in a thread, and a
scripted stand-in for the Service where a test needs exact control (a full queue, slow chunks,
known output text)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from hybridlm.serve.app import create_app
from hybridlm.serve.auth import KeyStore, hash_key
from hybridlm.serve.config import load_serve_config
from hybridlm.serve.service import Chunk, GenerationRequest, QueueFull

KEY = "sk-test-3f9a1c"
OTHER_KEY = "sk-other-77d0"


def keys(*plain: str) -> KeyStore:
    return KeyStore(frozenset(hash_key(k) for k in plain))


def config(tmp: Path, *overrides: str):
    """A server config writing its review queue and audit log under `tmp`."""
    return load_serve_config(None, [f'safety.review_db="{tmp / "review.sqlite"}"', f'audit.log="{tmp / "audit.jsonl"}"',
                                    *overrides])


@contextmanager
def running(app, timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a port the OS picks) until the block ends; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def serving(service, tmp: Path, *overrides: str, api_keys: KeyStore | None = None) -> Iterator[str]:
    app = create_app(service, config(tmp, *overrides), api_keys if api_keys is not None else keys(KEY, OTHER_KEY))
    with running(app) as url:
        yield url


class ScriptedService:
    """The Service contract with scripted output: every choice yields `pieces` (up to max_tokens),
    `delay` seconds apart, one token per piece; counts open streams like the engine's slots."""

    model_id = "scripted"
    context = 64
    max_tokens_cap = 32

    def __init__(self, pieces: list[str], delay: float = 0.0, fail: Exception | None = None) -> None:
        self.pieces, self.delay, self.fail = pieces, delay, fail
        self.active = 0
        self.closed = 0
        self.generated = 0
        self.requests: list[GenerationRequest] = []

    def encode_prompt(self, text: str) -> list[int]:
        return [0, *(ord(c) % 50 + 1 for c in text)]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return [0, *(ord(c) % 50 + 1 for m in messages for c in m["role"] + m["content"])]

    def count_tokens(self, text: str) -> int:
        return len(text)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(req)
        if self.fail is not None:
            raise self.fail
        self.active += req.n
        try:
            steps = self.pieces[: req.max_tokens]
            for step, piece in enumerate(steps):
                await asyncio.sleep(self.delay)
                for index in range(req.n):
                    self.generated += 1
                    yield Chunk(index, piece, [step], "length" if step == len(steps) - 1 else None)
        finally:
            self.active -= req.n
            self.closed += 1

    def stats(self) -> dict:
        return {"queue_depth": 0, "active_sequences": self.active, "batch_size": self.active,
                "tokens_generated": self.generated}


def queue_full() -> ScriptedService:
    return ScriptedService(["x"], fail=QueueFull("the server is busy (64 requests waiting); retry later"))
