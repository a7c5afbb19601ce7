"""One generation request from validated body to choices: the checks that need the running server,
the safety filter on the way in and out, rate-limit token accounting, and the bookkeeping that
metrics, the audit log and the review queue read.

Why apart from routes.py: the same steps serve completions and chat, streamed or not; the routes
only shape the result. Nothing here blocks the event loop: tokenizing runs in a worker thread,
generation runs in the Service's engine thread, review writes go to a one-thread executor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from hybridlm.serve.service import GenerationRequest, PromptTooLong, QueueFull
from hybridlm.serve.tools import render_messages, reply_grammar

if TYPE_CHECKING:
    from hybridlm.inference.grammar import Grammar
    from hybridlm.serve.monitoring import RequestRecord
    from hybridlm.serve.service import Chunk, ReplyStream, Service, TokenLogprob
    from hybridlm.serve.state import ServerState


@dataclass
class Job:
    """A request admitted for generation."""

    kind: str  # "completion" | "chat"
    id: str
    created: int
    model: str
    key_id: str
    gen: GenerationRequest
    stream: bool
    include_usage: bool
    record: RequestRecord
    reserved: int
    completion_tokens: int = 0
    first_chunk_at: float | None = None
    finished: bool = False
    texts: dict[int, str] | None = None
    """The text sent per choice, kept only when the audit log records text."""
    echo: Echo | None = None
    """The prompt to put before every choice's text (completions with echo)."""
    tool_mode: str | None = None
    """The chat request's tool choice ("none", "auto", "required", "function:NAME"; None without tools)."""
    service: Service | None = None
    """The version it runs on, from admission to its end (a hot swap does not move it)."""
    tool_names: frozenset[str] = frozenset()
    """The functions a reply may call (a call of any other stays text)."""


@dataclass(frozen=True)
class Echo:
    text: str
    framed: bool
    """Whether the prompt ids start with the <|eos|> the server put before a text prompt."""


def refund(state: ServerState, job: Job, all_of_it: bool = False) -> None:
    """Give back the tokens reserved for `job` that it did not use (all of them when it never ran)."""
    used = 0 if all_of_it else job.record.prompt_tokens + job.completion_tokens
    state.limiter.refund_tokens(job.key_id, job.reserved - used)


def close_job(state: ServerState, job: Job, finish_reasons: dict[int, str]) -> None:
    """A generation ended (completed, filtered or abandoned): usage, metrics, refund. Once per job."""
    if job.finished:
        return
    job.finished = True
    record = job.record
    record.completion_tokens = job.completion_tokens
    record.finish_reasons = [finish_reasons.get(i, "abandoned") for i in range(job.gen.n)]
    if job.texts is not None:
        record.output_text = [job.texts[i] for i in range(job.gen.n)]
    state.metrics.tokens_in.inc(record.prompt_tokens)
    state.metrics.tokens_out.inc(job.completion_tokens)
    if job.first_chunk_at is not None and job.completion_tokens > 1:
        per_token = (time.perf_counter() - job.first_chunk_at) / (job.completion_tokens - 1)
        state.metrics.per_token.labels(record.endpoint).observe(per_token)
    if record.ttft_s is not None:
        state.metrics.ttft.labels(record.endpoint).observe(record.ttft_s)
    refund(state, job)


@dataclass
class Piece:
    """Text for one choice, ready to send; `finish` is set on the choice's last piece."""

    index: int
    text: str
    finish: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """The tokens behind this piece, with their log-probabilities (when the request asked)."""


@dataclass
class Result:
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)


def _check_common(state: ServerState, service: Service, body: SamplingFields) -> None:
    served = [state.model_name, *service.adapter_names]
    if body.model not in served:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                       f"{', '.join(map(repr, served))} (see GET /v1/models)", param="model", code="model_not_found")
    max_n = min(state.config.server.max_n, state.config.server.max_batch)
    if body.n > max_n:
        raise ApiError(400, f"n is {body.n} but this server allows at most {max_n}", param="n")


def _check_cap(service: Service, asked: int | None) -> None:
    cap = service.max_tokens_cap
    if asked is not None and asked > cap:
        raise ApiError(400, f"max_tokens is {asked} but this server allows at most {cap}", param="max_tokens")


def _default_max_tokens(service: Service, chat: bool, prompt_len: int) -> int:
    """OpenAI's defaults: 16 for completions; for chat, as much as the cap and the context allow."""
    cap = service.max_tokens_cap
    return min(16, cap) if not chat else max(1, min(cap, service.context - prompt_len))


async def _screen(state: ServerState, texts: list[str], record: RequestRecord, param: str) -> list[str]:
    """The prompt filter: redacted texts, or a 400 when a block rule fires (and review items)."""
    if state.safety is None:
        return texts
    started = time.perf_counter()
    out, blocked = [], None
    for text in texts:
        verdict = state.safety.check(text, "prompt") if state.safety.fast else \
            await asyncio.to_thread(state.safety.check, text, "prompt")
        state.note_hits(verdict.hits, "prompt", text, record)
        blocked = blocked or next((h for h in verdict.hits if h.action == "block"), None)
        out.append(verdict.text)
    record.safety_s += time.perf_counter() - started
    if blocked is not None:
        raise ApiError(400, f"the prompt was blocked by the safety filter (rule {blocked.rule!r}); rephrase it",
                       param=param, code="content_filter")
    return out


async def admit(state: ServerState, service: Service, body: CompletionRequest | ChatCompletionRequest,
                record: RequestRecord, key_id: str) -> Job:
    """Every check that can refuse the request, in the order a client would want to hear about them;
    `service` is the version it runs on (the caller holds it)."""
    _check_common(state, service, body)
    chat = isinstance(body, ChatCompletionRequest)
    asked = body.requested_max_tokens() if chat else body.max_tokens
    record.stream, record.n, record.max_tokens = body.stream, body.n, asked
    record.end_user = getattr(body, "safety_identifier", None) or body.user
    _check_cap(service, asked)
    if chat:
        contents = await _screen(state, [m.text() for m in body.messages], record, "messages")
        messages = render_messages(body, contents)
        record.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        prompt_ids = await _encode(asyncio.to_thread(service.encode_chat, messages))
    else:
        if body.echo and body.stream:
            raise ApiError(400, "echo is not supported with stream; ask for one response", param="echo")
        if asked == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 asks for no tokens; it is only useful with echo", param="max_tokens")
        prompt_ids, prompt, framed = await _completion_prompt(state, service, body, record)
        record.prompt_text = prompt
    record.prompt_tokens = len(prompt_ids)
    if len(prompt_ids) >= service.context:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens but the context is {service.context}; "
                       "shorten it", param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = asked if asked is not None else _default_max_tokens(service, chat, len(prompt_ids))
    gen = GenerationRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
                            top_p=body.top_p, stop=body.stop_list(), seed=body.seed, n=body.n,
                            top_k=max(body.top_k, 0), min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                            logit_bias=_logit_bias(body.logit_bias, service.vocab_size),
                            top_logprobs=body.requested_top_logprobs(), grammar=await _grammar(service, body),
                            adapter=None if body.model == state.model_name else body.model)
    reserved = len(prompt_ids) + max_tokens * body.n
    state.charge_tokens(key_id, reserved)
    echo = Echo(prompt, framed) if not chat and body.echo else None
    return Job(kind="chat" if chat else "completion", id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
               created=int(time.time()), model=state.model_name, key_id=key_id, gen=gen, stream=body.stream,
               include_usage=body.include_usage(), record=record, reserved=reserved, echo=echo,
               tool_mode=body.tool_mode() if chat else None, service=service,
               tool_names=frozenset(t.function.name for t in (body.tools or [])) if chat else frozenset())


async def _grammar(service: Service, body: CompletionRequest | ChatCompletionRequest) -> Grammar | None:
    """The reply's constraint (compiled in a worker thread: a large schema takes milliseconds), or None."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    free = body.tool_mode() in (None, "none") and (body.response_format is None or body.response_format.type == "text")
    if free:
        return None
    try:
        compiler = service.grammars()
    except UserError as exc:
        raise ApiError(400, str(exc), param="response_format" if body.response_format else "tools") from None
    return await asyncio.to_thread(reply_grammar, body, compiler)


async def _completion_prompt(state: ServerState, service: Service, body: CompletionRequest, record: RequestRecord
                             ) -> tuple[list[int], str, bool]:
    """(ids, text, framed) of a completion prompt. Text is screened and framed with <|eos|> in front
    (framed=True); token ids are taken as they are, their decoded text screened (a redaction
    re-encodes the redacted text)."""
    ids = body.prompt_token_ids()
    if ids is None:
        (prompt,) = await _screen(state, [body.prompt_text()], record, "prompt")
        return await _encode(asyncio.to_thread(service.encode_prompt, prompt)), prompt, True
    if max(ids) >= service.vocab_size:
        raise ApiError(400, f"prompt holds token id {max(ids)}, outside this model's vocabulary "
                       f"(0..{service.vocab_size - 1})", param="prompt")
    text = service.tokenizer.decode(ids)
    (screened,) = await _screen(state, [text], record, "prompt")
    return (ids if screened == text else service.tokenizer.encode(screened)), screened, False


async def echoed(state: ServerState, job: Job) -> list[TokenLogprob] | None:
    """The prompt's token log-probabilities an echo reports (without the <|eos|> put in front of a
    text prompt), or None when the request asked for none."""
    if job.echo is None or job.gen.top_logprobs is None:
        return None
    entries = await job.service.prompt_logprobs(job.gen.prompt_ids, job.gen.top_logprobs, job.gen.adapter)
    return entries[1:] if job.echo.framed else entries


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's {"token id": value} as ids, each checked against the vocabulary."""
    ids = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:  # "²".isdigit() is True
            raise ApiError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})",
                           param="logit_bias")
        ids[int(key)] = value
    return ids


async def _encode(call) -> list[int]:
    try:
        return await call
    except UserError as exc:
        raise ApiError(400, str(exc)) from None


async def open_stream(state: ServerState, job: Job) -> tuple[ReplyStream, Chunk | None]:
    """Start generation; the Service raises for a full queue or a bad request before its first chunk."""
    stream = job.service.stream(job.gen)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return stream, None
    except QueueFull as exc:
        refund(state, job, all_of_it=True)
        raise ApiError(503, str(exc) or "the server is busy; retry later", type="server_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except PromptTooLong as exc:
        refund(state, job, all_of_it=True)
        raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
    except UserError as exc:
        refund(state, job, all_of_it=True)
        raise ApiError(400, str(exc)) from None
    return stream, first


async def pieces(state: ServerState, job: Job, stream: ReplyStream, first: Chunk | None) -> AsyncIterator[Piece]:
    """The choices' text through the output filter. A choice that a block rule stops ends with
    finish "content_filter" and stops decoding at once; the stream is closed as soon as every
    choice has ended."""
    guards = {i: state.safety.guard() for i in range(job.gen.n)} if state.safety else {}
    ended: set[int] = set()
    chunk = first
    if state.audit.with_text:
        job.texts = {i: "" for i in range(job.gen.n)}
    while chunk is not None and len(ended) < job.gen.n:
        if chunk.index not in ended:
            piece = _filter_chunk(state, job, chunk, guards.get(chunk.index))
            if piece.finish is not None:
                ended.add(piece.index)
                if chunk.finish_reason is None:  # the filter ended it: stop decoding it, others go on
                    stream.stop(piece.index)
            if job.texts is not None:
                job.texts[piece.index] += piece.text
            if piece.text or piece.finish or piece.logprobs:  # held-back text still sends its logprobs
                yield piece
        chunk = await anext(stream, None) if len(ended) < job.gen.n else None


def _filter_chunk(state: ServerState, job: Job, chunk: Chunk, guard) -> Piece:
    job.completion_tokens += len(chunk.token_ids)
    if job.first_chunk_at is None:
        job.first_chunk_at = time.perf_counter()
        job.record.first_token()
    if guard is None:
        return Piece(chunk.index, chunk.text, chunk.finish_reason, chunk.logprobs)
    started = time.perf_counter()
    text = guard.feed(chunk.text)
    finish = "content_filter" if guard.blocked else chunk.finish_reason
    if chunk.finish_reason is not None and not guard.blocked:
        text += guard.finish()
        finish = "content_filter" if guard.blocked else chunk.finish_reason
    job.record.safety_s += time.perf_counter() - started
    if guard.new_hits:
        state.note_hits(guard.new_hits, "output", guard.raw, job.record)
        guard.new_hits = []
    return Piece(chunk.index, text, finish, chunk.logprobs)


async def collect(state: ServerState, job: Job, stream: ReplyStream, first: Chunk | None) -> Result:
    """A non-streamed reply: every choice's whole text and finish reason."""
    result = Result({i: "" for i in range(job.gen.n)}, {})
    try:
        async for piece in pieces(state, job, stream, first):
            result.texts[piece.index] += piece.text
            if piece.finish:
                result.finish[piece.index] = piece.finish
            if piece.logprobs is not None:
                result.logprobs.setdefault(piece.index, []).extend(piece.logprobs)
    finally:
        await stream.aclose()
        close_job(state, job, result.finish)
    return result
