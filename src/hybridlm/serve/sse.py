"""Server-sent events that stop the moment the client goes away.

Why our own response class: whether Starlette's StreamingResponse notices a disconnect depends on
the ASGI server's spec version, and a reply held back by the safety filter, or still waiting in
the queue, writes nothing for a while, so "the next write fails" can come late. Here one task
waits for `http.disconnect` for the whole request (from before the first chunk to the last) and
the body is cancelled when it fires, which closes the Service stream and frees the batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("hybridlm.serve")
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the reply was ready."""


def watch_disconnect(receive: Receive) -> asyncio.Task:
    """A task that ends when the client disconnects (the request body must be read already)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.create_task(wait())


async def unless_gone(work: Awaitable[T], watch: asyncio.Task) -> T:
    """Await `work`, or cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


def event(data: Any) -> bytes:
    """One SSE event carrying JSON (or the literal [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """`text/event-stream` from an async iterator of encoded events, cancelled on disconnect."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], watch: asyncio.Task,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.events, self.watch, self.on_close = events, watch, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        try:
            await asyncio.wait({pump, self.watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, self.watch):
                task.cancel()
            for task in (pump, self.watch):
                try:
                    await task
                except (asyncio.CancelledError, OSError):
                    pass  # cancelled, or the client went away mid-write
                except Exception:
                    log.exception("streaming response failed")
            await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
