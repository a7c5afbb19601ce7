"""The HTTP routes: thin functions that authenticate, hand the body to generation.py, and shape the
result as OpenAI's JSON or server-sent events.

Streams end with `data: [DONE]`. A choice stopped by an output block rule ends with finish_reason
"content_filter" (the text before the match has been sent, nothing after it); an error after the
stream started arrives as one `data: {"error": {...}}` event before `[DONE]`. With tools, a chat
choice may turn out to be a call, so its text is held and sent whole in its last delta (as content,
or as `tool_calls` with finish_reason "tool_calls").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from hybridlm.errors import UserError
from hybridlm.serve.generation import Job, Result, admit, close_job, collect, echoed, open_stream, pieces
from hybridlm.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from hybridlm.serve.protocol import (
    ERROR_RESPONSES,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
    ToolCall,
    Usage,
)
from hybridlm.serve.sse import (
    ClientGone,
    EventStream,
    event,
    unless_gone,
    watch_disconnect,
)
from hybridlm.serve.state import ServerState, rate_limited
from hybridlm.serve.tools import as_tool_call

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="An API key from the server's key file or HYBRIDLM_API_KEYS.")
_STREAM_DOC = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "JSON, or server-sent events when stream is true"}}


def server(request: Request) -> ServerState:
    return request.app.state.server


async def api_key(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The caller's key id (401 without a valid key), after its request budget is charged (429)."""
    state = server(request)
    key_id = "anonymous"
    if state.keys.enabled:
        key_id = state.keys.identify(credentials.credentials if credentials else None) or ""
        if not key_id:
            raise ApiError(401, "missing or unknown API key; send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    request.state.record.key_id = key_id
    limited = state.limiter.take_request(key_id)
    if limited is not None:
        raise rate_limited(limited)
    return key_id


KeyId = Annotated[str, Depends(api_key)]


@router.get("/health")
async def health(request: Request) -> dict:
    state = server(request)
    return {"status": "ok", "model": state.model_name, "version": state.service.version,
            "last_swap_error": state.swapper.last_error or None, **state.service.stats()}


async def admin_key(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """401 unless the caller holds an admin key (403 when the server has none configured)."""
    state = server(request)
    if not state.admin_keys.enabled:
        raise ApiError(403, "this server has no admin keys (--admin-keys or HYBRIDLM_ADMIN_KEYS); it takes no "
                       "admin requests", type="permission_error", code="admin_disabled")
    if not state.admin_keys.identify(credentials.credentials if credentials else None):
        raise ApiError(401, "an admin key is needed; send it as 'Authorization: Bearer <key>'", code="invalid_api_key")


@router.post("/admin/reload", responses=ERROR_RESPONSES, dependencies=[Depends(admin_key)])
async def reload(request: Request) -> dict:
    """Check the model source now: swap to its current version if it moved (409 when that version
    cannot be loaded; the old one keeps serving)."""
    try:
        return await server(request).swapper.refresh()
    except UserError as exc:
        raise ApiError(409, str(exc), type="server_error", code="reload_failed") from None


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    state = server(request)
    return Response(state.metrics.scrape(state.service.stats()), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(request: Request, key_id: KeyId) -> ModelList:
    state = server(request)
    service, created = state.service, int(time.time())
    return ModelList(data=[ModelCard(id=name, created=created, context_length=service.context,
                                     max_tokens=service.max_tokens_cap, version=service.version)
                           for name in (state.model_name, *service.adapter_names)])


@router.post("/v1/feedback", response_model=FeedbackResponse, responses=ERROR_RESPONSES)
async def feedback(body: FeedbackRequest, request: Request, key_id: KeyId) -> FeedbackResponse:
    """A rating (thumbs up/down) of one reply, or the reply picked of two, kept with the exact
    conversation, the model and the key id for `hybridlm feedback export`."""
    state = server(request)
    service = state.service
    if body.model not in (state.model_name, *service.adapter_names):
        raise ApiError(404, f"model {body.model!r} is not served here (see GET /v1/models)", param="model",
                       code="model_not_found")
    stored = await asyncio.to_thread(
        state.feedback.add, key_id=key_id, model=body.model, version=service.version,
        messages=[m.model_dump() for m in body.messages], reply=body.reply, rating=body.rating, chosen=body.chosen,
        rejected=body.rejected)
    return FeedbackResponse(id=stored)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def completions(body: CompletionRequest, request: Request, key_id: KeyId) -> Response:
    return await _generate(request, body, key_id)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, **_STREAM_DOC})
async def chat_completions(body: ChatCompletionRequest, request: Request, key_id: KeyId) -> Response:
    return await _generate(request, body, key_id)


async def _generate(request: Request, body: CompletionRequest | ChatCompletionRequest, key_id: str) -> Response:
    """Admit, start, then answer: one JSON document, or events until [DONE]. A client that leaves
    at any point cancels the generation (its batch slots are freed at once)."""
    state, record = server(request), request.state.record
    service = state.service  # this request's version, whatever a hot swap does meanwhile
    service.hold()
    record.model_version = service.version
    streaming = False
    try:
        response = await _answer(request, state, service, body, key_id)
        streaming = isinstance(response, EventStream)
        response.headers["x-hybridlm-model-version"] = service.version
        return response
    finally:
        if not streaming:  # a stream lets go of its service when it closes
            service.release()


async def _answer(request: Request, state: ServerState, service, body, key_id: str) -> Response:
    record = request.state.record
    job = await admit(state, service, body, record, key_id)
    watch = watch_disconnect(request.receive)
    try:
        if job.gen.max_tokens == 0:  # echo alone: the prompt is the whole reply
            result = Result({i: "" for i in range(job.gen.n)}, {i: "length" for i in range(job.gen.n)})
            close_job(state, job, result.finish)
        else:
            stream, first = await unless_gone(open_stream(state, job), watch)
            if job.stream:
                async def close() -> None:  # also when the body never started (the client left at once)
                    await stream.aclose()
                    close_job(state, job, {})
                    service.release()

                return EventStream(_events(state, job, stream, first), watch, on_close=close)
            result = await unless_gone(collect(state, job, stream, first), watch)
        prompt_logprobs = await unless_gone(echoed(state, job), watch)
    except ClientGone:
        record.error_code = "client_disconnected"
        close_job(state, job, {})
        return Response(status_code=499)
    except BaseException:
        watch.cancel()
        raise
    watch.cancel()
    usage, tokenizer = _usage(job), service.tokenizer
    wants = job.gen.top_logprobs is not None
    if job.kind == "chat":
        choices = []
        for i, text in result.texts.items():
            content, calls, finish = as_tool_call(text, result.finish.get(i), job.tool_mode, job.tool_names)
            choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                                      finish_reason=finish,
                                      logprobs=chat_logprobs(tokenizer, result.logprobs.get(i, [])) if wants else None))
        doc = ChatCompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
    else:
        echo = job.echo.text if job.echo else ""
        choices = [CompletionChoice(index=i, text=echo + t, finish_reason=result.finish.get(i),
                                    logprobs=completion_logprobs(tokenizer, (prompt_logprobs or []) +
                                                                 result.logprobs.get(i, []), TextOffsets())
                                    if wants else None)
                   for i, t in result.texts.items()]
        doc = CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
    return JSONResponse(doc.model_dump())


def _usage(job: Job) -> Usage:
    prompt = job.record.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=job.completion_tokens,
                 total_tokens=prompt + job.completion_tokens)


async def _events(state: ServerState, job: Job, stream, first) -> AsyncIterator[bytes]:
    """The SSE body. Its `finally` runs on success, error and disconnect alike."""
    finish: dict[int, str] = {}
    offsets = {i: TextOffsets() for i in range(job.gen.n)}
    held = {i: "" for i in range(job.gen.n)} if job.tool_mode not in (None, "none") else None
    try:
        if job.kind == "chat":
            yield event(_frame(job, [_choice(job, i, "", role=True) for i in range(job.gen.n)]))
        async for piece in pieces(state, job, stream, first):
            if piece.finish:
                finish[piece.index] = piece.finish
            logprobs = None
            if piece.logprobs is not None:
                tokenizer = job.service.tokenizer
                logprobs = (chat_logprobs(tokenizer, piece.logprobs) if job.kind == "chat" else
                            completion_logprobs(tokenizer, piece.logprobs, offsets[piece.index])).model_dump()
            if held is None:
                yield event(_frame(job, [_choice(job, piece.index, piece.text, piece.finish, logprobs=logprobs)]))
                continue
            # With tools, a choice may turn out to be a call: its text is held and sent whole at its end.
            held[piece.index] += piece.text
            text = held[piece.index] if piece.finish else ""
            content, calls, reason = as_tool_call(text, piece.finish, job.tool_mode, job.tool_names)
            finish[piece.index] = reason or finish.get(piece.index)
            yield event(_frame(job, [_choice(job, piece.index, content or "", reason, logprobs=logprobs,
                                             tool_calls=calls)]))
        if job.include_usage:
            yield event(_frame(job, [], _usage(job)))
        yield event("[DONE]")
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, keep the server up
        error = exc if isinstance(exc, ApiError) else ApiError(
            500, f"generation failed: {exc}" if str(exc) else f"generation failed ({type(exc).__name__})",
            type="server_error", code="internal_error")  # the scheduler's own words, e.g. "shutting down"
        job.record.error_code = error.code
        yield event(error.body())
        yield event("[DONE]")
    finally:
        await stream.aclose()
        close_job(state, job, finish)


def _frame(job: Job, choices: list[dict], usage: Usage | None = None) -> dict:
    """One streamed chunk in OpenAI's shape (`chat.completion.chunk` or `text_completion`)."""
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    doc = {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": choices}
    if usage is not None:
        doc["usage"] = usage.model_dump()
    return doc


def _choice(job: Job, index: int, text: str, finish: str | None = None, role: bool = False,
            logprobs: dict | None = None, tool_calls: list[ToolCall] | None = None) -> dict:
    if job.kind != "chat":
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
    delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
    if tool_calls:
        delta["tool_calls"] = [{"index": k, **call.model_dump()} for k, call in enumerate(tool_calls)]
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
