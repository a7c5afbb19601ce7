"""Helpers for the HTTP tests: a real uvicorn server on a free 127.0.0.1 port in a thread, serving
a real Service on a run directory, and raw-socket clients that decide exactly when they leave."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import uvicorn

from hybridlm.serve.app import create_app
from hybridlm.serve.auth import KeyStore, hash_key
from hybridlm.serve.config import load_serve_config

KEY = "sk-test-3f9a1c"
OTHER_KEY = "sk-other-77d0"
NO_LIMITS = ("limits.requests_per_minute=0", "limits.tokens_per_minute=0")


def keys(*plain: str) -> KeyStore:
    return KeyStore(frozenset(hash_key(k) for k in plain))


def config(tmp: Path, *overrides: str):
    """A server config writing its review queue, feedback and audit log under `tmp`."""
    return load_serve_config(None, [f'safety.review_db="{tmp / "review.sqlite"}"', f'audit.log="{tmp / "audit.jsonl"}"',
                                    f'server.feedback_db="{tmp / "feedback.sqlite"}"', *overrides])


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
def serving_run(run_dir: Path, tmp: Path, *overrides: str, api_keys: KeyStore | None = None) -> Iterator[SimpleNamespace]:
    """`create_app` on `run_dir` with the config `hybridlm serve` would read (fp32 unless
    overridden), served on 127.0.0.1; yields (url, model, service, tmp)."""
    cfg = config(tmp, "server.dtype=\"fp32\"", *overrides)
    app = create_app(run_dir, cfg, api_keys if api_keys is not None else keys(KEY, OTHER_KEY))
    service = app.state.server.service
    with running(app) as url:
        yield SimpleNamespace(url=url, model=service.model_id, service=service, tmp=tmp)


def rules(*specs: dict) -> str:
    """A `safety.rules=[...]` override from rule tables (strings quoted as TOML basic strings)."""
    def value(v) -> str:
        return "true" if v is True else "false" if v is False else json.dumps(v)
    return "safety.rules=[" + ", ".join("{" + ", ".join(f"{k} = {value(v)}" for k, v in spec.items()) + "}"
                                        for spec in specs) + "]"


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        return json.loads(response.read())


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "the condition") -> float:
    """Poll until `condition()` holds; returns the seconds it took (fails after `timeout`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


def send(url: str, body: dict, path: str = "/v1/completions", key: str = KEY) -> socket.socket:
    """POST `body` over a raw socket and return it unread: the test decides when the client reads or
    leaves (closing the socket is a disconnect). The server closes it after the response."""
    parts = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def first_event(sock: socket.socket) -> bytes:
    """Read a streamed response until its first `data:` event has arrived; returns what was read."""
    received = b""
    while b"data: " not in received:
        more = sock.recv(4096)
        assert more, f"the connection closed before the first event: {received[:300]!r}"
        received += more
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    return received


def response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of a (non-streamed) response, read to the end; closes the socket."""
    received = b""
    while more := sock.recv(65536):
        received += more
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@contextmanager
def holding_the_slot(url: str, model: str, max_tokens: int) -> Iterator[None]:
    """A long greedy stream that is running (its first event arrived) until the block ends, when
    its client disconnects. On a server with max_batch=1 it keeps every other request waiting."""
    sock = send(url, {"model": model, "prompt": "Paragraph 1", "max_tokens": max_tokens, "temperature": 0,
                      "stream": True})
    try:
        first_event(sock)
        yield
    finally:
        sock.close()
