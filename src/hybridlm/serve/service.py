"""The service layer: text <-> token ids <-> the batching scheduler, for the HTTP routes to call.

It knows the run (model id, context, tokenizer, how prompts are framed) and turns the scheduler's
token events into text chunks per choice, honouring stop strings and holding back unfinished
UTF-8 (inference/text.py). It knows nothing of HTTP: errors are exceptions (QueueFull -> 503,
UserError / PromptTooLong -> 400) that the routes map.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hybridlm.errors import UserError
from hybridlm.inference.generate import completion_prompt_ids
from hybridlm.inference.grammar import Grammar, GrammarCompiler
from hybridlm.inference.sampling import SamplingParams, token_logprobs
from hybridlm.inference.text import TextStream
from hybridlm.inference.scheduler import PromptTooLong, QueueFull, Request, Scheduler, TokenEvent
from hybridlm.model.converters.lora import has_lora, merged_model
from hybridlm.run import attach_served_adapter, load_run_on_device
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.chat import Message, render_chat

if TYPE_CHECKING:
    from hybridlm.serve.config import ServerSettings

__all__ = ["Chunk", "GenerationRequest", "PromptTooLong", "QueueFull", "ReplyStream", "Service", "TokenLogprob"]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    """Choice i samples from seed + i (so choice 0 repeats a single-choice request)."""
    n: int = 1
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit (ids checked against the vocabulary by the caller)."""
    top_logprobs: int | None = None
    """Log-probabilities of each token and this many alternatives (None: none)."""
    grammar: Grammar | None = None
    """The reply must match it (a JSON schema, a tool call)."""
    adapter: str | None = None
    """The LoRA adapter to decode with (None: the base model)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives at its step."""

    token: int
    logprob: float | None
    """None for a prompt's first token, which nothing before it predicts."""
    top: tuple[tuple[int, float], ...]


@dataclass
class Chunk:
    index: int
    """Choice index (0..n-1)."""
    text: str
    """New text; "" when only the finish is being reported."""
    token_ids: list[int]
    """Every token generated since the previous chunk of this choice (a final eos included), so
    their lengths add up to the completion's token count."""
    finish_reason: str | None
    """None while running, then "stop" (eos / end of turn, or a stop string) or "length"."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of token_ids, when the request asked for log-probabilities."""


class _Choice:
    """Per-choice text state: tokens not yet reported, and the stop-string-aware decoder."""

    def __init__(self, index: int, tokenizer: TextTokenizer, stop: tuple[str, ...]) -> None:
        self.index, self.text = index, TextStream(tokenizer, stop)
        self.pending: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.done = False

    def take(self, event: TokenEvent) -> Chunk | None:
        """The chunk this token completes, or None while its text is held back."""
        if self.done:  # tokens the scheduler produced after a stop string
            return None
        self.pending.append(event.token)
        if event.logprob is not None:
            self.pending_logprobs.append(TokenLogprob(event.token, event.logprob, event.top))
        piece = self.text.push(event.token)
        finish = "stop" if self.text.stopped else event.finish
        if finish is not None and not self.text.stopped:
            piece += self.text.flush()
        if not piece and finish is None:
            return None
        chunk = Chunk(self.index, piece, self.pending, finish, self.pending_logprobs if event.logprob is not None else None)
        self.pending, self.pending_logprobs = [], []
        self.done = finish is not None
        return chunk


class Service:
    """One loaded run behind a continuous-batching scheduler."""

    def __init__(self, run_dir: Path, *, max_batch: int = 16, max_queue: int = 64, max_tokens_cap: int = 512,
                 dtype: str = "auto", prefix_cache_mb: int = 256, adapters: dict[str, str] | None = None) -> None:
        if dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"dtype must be auto, fp32 or bf16 (got {dtype!r})")
        run, _ = load_run_on_device(Path(run_dir), dtype)
        model = run.model
        if adapters and has_lora(model):
            raise UserError(f"{run_dir} is a LoRA run; serve a plain base (`hybridlm lora merge` it) to add adapters")
        if has_lora(model):  # a LoRA run served as itself: its adapters folded in, decoded at the base's speed
            model = merged_model(model)
        for name, adapter_dir in (adapters or {}).items():
            attach_served_adapter(model, Path(run_dir), Path(adapter_dir), name, run.tokenizer)
        self.adapter_names: list[str] = sorted(adapters or {})
        self.tokenizer = run.tokenizer
        self.model_id: str = run.path.name
        self.context: int = model.cfg.max_seq_len
        self.vocab_size: int = model.cfg.vocab_size
        self.max_tokens_cap = max_tokens_cap
        # Completions end at eos (the document boundary of pre-training), chat replies at <|end|>
        # (the end of an assistant turn in instruction tuning): either one ends a choice.
        self._stop_ids = frozenset({self.tokenizer.eos_id, self.tokenizer.special_ids["end"]})
        self._grammars: GrammarCompiler | None = None
        self.version = self.model_id
        """The label of what is served (a registry version, NAME/3, or the run directory's name)."""
        self._holds, self._retired = 0, False
        self._closing: asyncio.Future | None = None
        self._scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, max_tokens_cap=max_tokens_cap,
                                    prefix_cache_bytes=prefix_cache_mb << 20)

    @classmethod
    def from_settings(cls, run_dir: Path, server: ServerSettings) -> Service:
        """The service the [server] section describes: the one place its batch, queue, token cap,
        dtype and prefix cache reach the scheduler (`hybridlm serve`, create_app)."""
        return cls(run_dir, max_batch=server.max_batch, max_queue=server.max_queue,
                   max_tokens_cap=server.max_tokens_cap, dtype=server.dtype, prefix_cache_mb=server.prefix_cache_mb,
                   adapters=server.adapters)

    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this tokenizer, built at the first constrained request."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self._stop_ids)
        return self._grammars

    def encode_prompt(self, text: str) -> list[int]:
        return completion_prompt_ids(self.tokenizer, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template of instruction tuning, ending with the assistant marker."""
        if not messages:
            raise UserError("messages is empty; give at least one message")
        parsed = []
        for message in messages:
            if not isinstance(message.get("content"), str) or not isinstance(message.get("role"), str):
                raise UserError("each message needs a string role and a string content")
            parsed.append(Message(message["role"], message["content"]))
        return render_chat(self.tokenizer, parsed, add_generation_prompt=True)[0]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    async def start(self) -> None:
        self._scheduler.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.close)

    def hold(self) -> None:
        """A request started on this service: it stays open until the matching release."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._retired and self._holds == 0 and self._closing is None:
            self._closing = asyncio.ensure_future(self.close())

    async def retire(self) -> None:
        """No new requests will come (a hot swap replaced it): close once the held ones end."""
        self._retired = True
        if self._holds == 0 and self._closing is None:
            self._closing = asyncio.ensure_future(self.close())
        while self._closing is None:  # the last held request schedules the close
            await asyncio.sleep(0.05)
        await self._closing

    def stream(self, req: GenerationRequest) -> ReplyStream:
        """Chunks of all n choices, interleaved as they are produced (see ReplyStream)."""
        return ReplyStream(self, req)

    async def prompt_logprobs(self, ids: list[int], top: int, adapter: str | None = None) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (None for the first, which
        nothing predicts) and the `top` alternatives: what `echo` with `logprobs` reports. Runs on
        the scheduler's thread, between decode steps."""
        def score(model) -> list[TokenLogprob]:
            device = next(model.parameters()).device
            logits_TV = model(torch.tensor([ids], device=device))[0].float().cpu()
            entries = [TokenLogprob(ids[0], None, ())]
            for position, token in enumerate(ids[1:]):
                logprob, alternatives = token_logprobs(logits_TV[position], token, top)
                entries.append(TokenLogprob(token, logprob, alternatives))
            return entries

        return await asyncio.wrap_future(self._scheduler.call(score, adapter))

    def stats(self) -> dict:
        """{"queue_depth", "active_sequences", "batch_size" (of the last decode step), "tokens_generated",
        "prefix_cache" (its counters, or None when off)}."""
        return self._scheduler.stats()

    def submit(self, req: GenerationRequest) -> Request:
        return self._scheduler.submit(req.prompt_ids, self._params(req), self._stop_ids, req.adapter)

    def _params(self, req: GenerationRequest) -> list[SamplingParams]:
        if req.n < 1:
            raise UserError(f"n must be >= 1 (got {req.n})")
        if req.max_tokens <= 0:
            raise UserError(f"max_tokens must be > 0 (got {req.max_tokens})")
        return [
            SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                           top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                           presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                           logit_bias=tuple(sorted(req.logit_bias.items())), top_logprobs=req.top_logprobs,
                           seed=None if req.seed is None else req.seed + i, stop=tuple(req.stop), grammar=req.grammar)
            for i in range(req.n)
        ]


class ReplyStream:
    """The chunks of one request's n choices as they are produced. The request is submitted at the
    first `__anext__`, so bad input and a full queue raise there, before any chunk. `stop(i)` ends
    choice i early (an output filter blocked it) and frees its batch slot at once; `aclose`, a
    cancelled task or the last choice ending frees them all."""

    def __init__(self, service: Service, req: GenerationRequest) -> None:
        self._service, self._req = service, req
        self._request: Request | None = None
        self._choices = [_Choice(i, service.tokenizer, tuple(req.stop)) for i in range(req.n)]
        self._running = req.n

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._request is None:
            self._request = self._service.submit(self._req)
        try:
            while self._running:
                event = await self._request.next_event()
                chunk = self._choices[event.index].take(event)
                if chunk is None:
                    continue
                if chunk.finish_reason is not None:
                    self._running -= 1
                    if not event.finish:  # a stop string ended it: the scheduler would go on
                        self._request.cancel(chunk.index)
                return chunk
        except BaseException:
            self._request.cancel()
            raise
        self._request.cancel()
        raise StopAsyncIteration

    def stop(self, index: int) -> None:
        """End choice `index` now: no more of its chunks, and its slot is freed."""
        choice = self._choices[index]
        if not choice.done:
            choice.done = True
            self._running -= 1
            if self._request is not None:
                self._request.cancel(index)

    async def aclose(self) -> None:
        if self._request is not None:
            self._request.cancel()
