"""The FastAPI application: request observation, size limit, error mapping, and the uvicorn runner
behind `hybridlm serve` (the shared state is state.py).

Why FastAPI + uvicorn: the OpenAPI document comes from the same pydantic models that validate
requests, async handlers let one process hold hundreds of open streams while the engine thread
decodes, and both are widely used and maintained. Every refusal, from a malformed body to a full
queue, leaves as an OpenAI-style error object with a 4xx (503 for a full queue), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybridlm.serve.auth import KeyStore
from hybridlm.serve.config import ServeConfig
from hybridlm.serve.hotswap import FixedRun, ModelSource
from hybridlm.serve.monitoring import AuditLog, Metrics, RequestRecord, endpoint_label
from hybridlm.serve.protocol import ApiError
from hybridlm.serve.state import build_state

log = logging.getLogger("hybridlm.serve")
STATIC_DIR = Path(__file__).parent / "static"


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes the limit (a subclass of HTTPException so that
    FastAPI's body parsing lets it through unchanged)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    """Refuses bodies over `limit` bytes: at once from Content-Length, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            error = ApiError(413 if length.isdigit() else 400, f"request body is larger than {self.limit} bytes"
                             if length.isdigit() else "Content-Length is not a number", code="request_too_large")
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class Observe:
    """Outermost layer: a RequestRecord per request, then the status count, the end-to-end time and
    one audit line when the response is complete (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, audit: AuditLog,
                 on_record: Callable[[RequestRecord], None] | None = None) -> None:
        self.app, self.metrics, self.audit, self.on_record = app, metrics, audit, on_record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope["path"])
        record = RequestRecord(request_id=uuid.uuid4().hex, endpoint=endpoint, method=scope["method"])
        length = dict(scope["headers"]).get(b"content-length", b"")
        record.request_bytes = int(length) if length.isdigit() else 0
        scope.setdefault("state", {})["record"] = record

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]
            elif message["type"] == "http.response.body":
                record.response_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            record.status = record.status or 499  # no response started: the client went away
            record.duration_s = time.perf_counter() - record.started
            self.metrics.requests.labels(endpoint, str(record.status)).inc()
            self.metrics.e2e.labels(endpoint).observe(record.duration_s)
            if record.safety_s:
                self.metrics.safety_seconds.observe(record.safety_s)
            if endpoint.startswith("/v1/"):
                self.audit.write(record)
                if self.on_record is not None and record.model_version is not None:
                    self.on_record(record)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _param(loc: tuple) -> str | None:
    """The request field an error is about, as OpenAI names it ("messages.0.role"): the body
    prefix and pydantic's union-member tags ("str", "list[str]", "TextPart") are dropped."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part != "body" and part not in _TYPE_TAGS and not any(c in part for c in "[]-") and not part[:1].isupper():
            parts.append(part)
    return ".".join(parts) or None


def _validation_error(errors: list[dict]) -> ApiError:
    """One 400 for a body that failed validation: the first field's problems, in one message."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})",
                        code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    messages = list(dict.fromkeys(e["msg"] for e in errors if _param(tuple(e.get("loc", ()))) == param))[:3]
    return ApiError(400, f"{param + ': ' if param else ''}{'; or '.join(messages)}", param=param,
                    code="invalid_value")


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    record = getattr(request.state, "record", None)
    if record is not None:
        record.error_code = error.code or error.type
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every refusal to `{"error": {message, type, param, code}}`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, _validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return _error_response(request, ApiError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                                                 headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s", request.url.path)
        return _error_response(request, ApiError(500, f"internal error ({type(exc).__name__}); see the server log",
                                                 type="server_error", code="internal_error"))


def create_app(model: Path | ModelSource, config: ServeConfig, keys: KeyStore,
               admin_keys: KeyStore | None = None) -> FastAPI:
    """The ASGI app serving `model` (a run directory, or a source such as a registry alias that the
    server follows by hot swap) as `config` says (its [server] section sizes the Service; nothing
    else does). Services are started and closed with the app's lifespan."""
    from fastapi.staticfiles import StaticFiles

    from hybridlm.serve.routes import router
    from hybridlm.serve.service import Service

    source = model if not isinstance(model, str | Path) else FixedRun(Path(model))
    label, run_dir = source.current()
    source.check(label, run_dir)
    service = Service.from_settings(run_dir, config.server)
    service.version = label
    state = build_state(service, config, keys, source, admin_keys or KeyStore(frozenset()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.swapper.service.start()  # not `service`: a closure would keep a swapped-out version alive
        poller = asyncio.ensure_future(state.swapper.poll()) if source.follows and config.server.alias_poll_s else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await state.swapper.close()
            state.writer.shutdown(wait=True)
            state.audit.close()

    app = FastAPI(title="hybridlm", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions and chat for a hybridlm run.")
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    if STATIC_DIR.is_dir():  # the chat page, when it is installed
        app.router.default = StaticFiles(directory=STATIC_DIR, html=True)  # only paths no route matches: a wrong method on an API path stays 405
    app.add_middleware(BodyLimit, limit=config.server.max_body_bytes)
    app.add_middleware(Observe, metrics=state.metrics, audit=state.audit, on_record=state.swapper.observe)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hybridlm")
    except PackageNotFoundError:
        return "0"


def serve(model: Path | ModelSource, config: ServeConfig, keys: KeyStore, host: str, port: int,
          admin_keys: KeyStore | None = None) -> None:
    """Load the model and serve it until interrupted (`hybridlm serve`)."""
    import uvicorn

    app = create_app(model, config, keys, admin_keys)
    if not keys.enabled:
        print("warning: no API keys configured (--api-keys or HYBRIDLM_API_KEYS): anyone who can reach "
              f"{host}:{port} may use this server", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info",
                timeout_graceful_shutdown=5)
