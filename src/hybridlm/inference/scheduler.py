"""Continuous batching: requests join the running decode batch between steps and leave when done.

One background thread owns the model. Each pass of its loop (1) drops cancelled sequences and
admits waiting requests while batch slots are free, (2) prefills newly admitted prompts alone,
in chunks at fixed offsets (so a prompt is split the same way whatever else is running), and
(3) runs one decode step for every active sequence at once (HybridLM.decode_rows). Every
sequence owns its per-layer caches from `model.new_cache()`, so dense and sparse layers keep
their own cache shapes. With a prefix cache (prefix_cache.py), a prompt starts from the cached
blocks of the longest prefix it shares with earlier prompts. Tokens travel to the asyncio side through one `asyncio.Queue` per
request, fed with `call_soon_threadsafe`: the event loop never runs model code, and the scheduler
never waits on a consumer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from hybridlm.errors import UserError
from hybridlm.inference.decode import prefill, sampling_generator
from hybridlm.inference.grammar import GrammarMatcher
from hybridlm.inference.prefix_cache import PrefixCache
from hybridlm.inference.sampling import SamplingParams, choose_token, token_logprobs
from hybridlm.model import HybridLM
from hybridlm.model.converters.lora import tuner_layers, use_adapter
from hybridlm.model.transformer import LayerCache

_NO_IDS = torch.empty(0, dtype=torch.long)  # no penalty: no history tensor per step


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should retry later (HTTP 503)."""


class PromptTooLong(UserError):
    """The prompt leaves no room in the context for a single new token (HTTP 400)."""


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of choice `index`; `finish` is set on the choice's last token:
    "stop" (a stop token such as eos) or "length" (max tokens, or the context is full)."""

    index: int
    token: int
    finish: str | None
    logprob: float | None = None
    """log p(token) under the model's raw distribution, when the choice asked for log-probabilities."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (id, log-probability) pairs at this step, most likely first."""


class Request:
    """Handle of a submitted request: its n choices' tokens arrive on `events`."""

    def __init__(self, scheduler: Scheduler, prompt_ids: list[int], params: list[SamplingParams],
                 stop_ids: frozenset[int], loop: asyncio.AbstractEventLoop, adapter: str | None = None) -> None:
        self.scheduler, self.prompt_ids, self.params, self.stop_ids = scheduler, prompt_ids, params, stop_ids
        self.loop, self.adapter = loop, adapter
        self.events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.cancelled: set[int] = set()
        """Choice indices whose consumer is gone; written under the scheduler's lock."""

    @property
    def n(self) -> int:
        return len(self.params)

    async def next_event(self) -> TokenEvent:
        """The next token of any choice; re-raises an error the scheduler hit on this request."""
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self, index: int | None = None) -> None:
        """Stop one choice (or all): its slot is freed before the scheduler's next decode step."""
        self.scheduler.cancel(self, index)


@dataclass
class _Sequence:
    """One choice being decoded: its own caches, sampling state and the token to feed next."""

    request: Request
    index: int
    cache: list[LayerCache]
    generator: torch.Generator
    seen: list[int]
    matcher: GrammarMatcher | None = None
    """Where the reply stands in the request's grammar, when it has one."""
    produced: int = 0
    last: int = -1
    finished: bool = False


@dataclass
class _Prefill:
    """A request whose prompt is going into its cache, one chunk per call of `step`."""

    request: Request
    ids_1T: torch.Tensor
    cache: list[LayerCache]
    done: int = 0
    logits_V: torch.Tensor | None = field(default=None, repr=False)

    looked_up: bool = False

    def step(self, model: HybridLM, chunk: int, prefix: PrefixCache | None) -> int:
        """Run the next chunk (at a fixed offset, a multiple of `chunk`); returns how many tokens
        it took. The first call starts from the longest cached prefix; full chunks are cached."""
        if prefix is not None and not self.looked_up:
            self.done = prefix.restore(self.request.prompt_ids, self.cache)
        self.looked_up = True
        end = min(self.done + chunk, self.ids_1T.shape[1])
        self.logits_V = prefill(model, self.ids_1T[:, self.done : end], self.cache)[0]
        taken, self.done = end - self.done, end
        if prefix is not None and end % chunk == 0:
            prefix.store(self.request.prompt_ids, self.cache, end)
        return taken

    @property
    def complete(self) -> bool:
        return self.done == self.ids_1T.shape[1]


class Scheduler:
    """Schedules requests onto one model in a background thread (see the module docstring)."""

    def __init__(self, model: HybridLM, *, max_batch: int = 16, max_queue: int = 64,
                 max_tokens_cap: int = 512, prefill_chunk: int = 256, prefix_cache_bytes: int = 0) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_tokens_cap", max_tokens_cap), ("prefill_chunk", prefill_chunk)):
            if value <= 0:
                raise UserError(f"{name} must be > 0 (got {value})")
        if prefix_cache_bytes < 0:
            raise UserError(f"prefix_cache_bytes must be >= 0 (0 turns the prefix cache off; got {prefix_cache_bytes})")
        self.prefix = PrefixCache(prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes else None
        """Blocks of prefilled prompts, one block per prefill chunk (so a restored prefix ends where
        an uncached prefill's chunk would: the rest is computed alike)."""
        self.model, self.context = model, model.cfg.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_tokens_cap, self.prefill_chunk = max_tokens_cap, prefill_chunk
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._calls: deque = deque()
        self._prefilling: list[_Prefill] = []
        self._running: list[_Sequence] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_batch = 0
        self._tokens = 0
        self._adapter_layers = tuner_layers(model)
        self.adapters = frozenset(name for layer in self._adapter_layers for name in getattr(layer, "lora_A", {}))
        """Adapter names a request may ask for (model/converters/lora.py); None is the base model."""

    # ---- the asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="hybridlm-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (blocking: call it through asyncio.to_thread); open requests get an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt_ids: list[int], params: list[SamplingParams],
               stop_ids: frozenset[int] = frozenset(), adapter: str | None = None) -> Request:
        """Queue a request of len(params) choices, decoded with LoRA adapter `adapter` (None: the base
        model); call from the event loop that will consume it. Raises PromptTooLong / UserError for
        bad input and QueueFull when the queue is full."""
        self._check(prompt_ids, params)
        if adapter is not None and adapter not in self.adapters:
            raise UserError(f"no adapter named {adapter!r} is loaded (loaded: {', '.join(sorted(self.adapters)) or 'none'})")
        request = Request(self, list(prompt_ids), list(params), frozenset(stop_ids), asyncio.get_running_loop(), adapter)
        with self._cond:
            if self._thread is None or self._closing:
                raise RuntimeError("the scheduler is not running; call start() first")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({len(self._waiting)} requests waiting); retry later")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request, index: int | None = None) -> None:
        """A waiting request leaves the queue now; running sequences leave before the next step."""
        with self._cond:
            request.cancelled.update(range(request.n) if index is None else [index])
            if len(request.cancelled) == request.n and request in self._waiting:
                self._waiting.remove(request)
            self._cond.notify()

    def call(self, fn, adapter: str | None = None) -> concurrent.futures.Future:
        """Run `fn(model)` on the scheduler thread between decode passes, with LoRA adapter `adapter`
        applied (the model is only ever used from that thread: the fused kernels keep per-thread
        buffers); a future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread is None or self._closing:
                raise RuntimeError("the scheduler is not running; call start() first")
            self._calls.append((fn, future, adapter))
            self._cond.notify()
        return future

    def stats(self) -> dict:
        """Queue depth, sequences holding a slot (prefilling or decoding), the last decode step's
        batch size, tokens sampled since start, and the prefix cache's counters (None when off)."""
        with self._cond:
            active = len(self._running) + sum(job.request.n - len(job.request.cancelled) for job in self._prefilling)
            return {"queue_depth": len(self._waiting), "active_sequences": active,
                    "batch_size": self._last_batch, "tokens_generated": self._tokens,
                    "prefix_cache": self.prefix.stats() if self.prefix is not None else None}

    def _check(self, prompt_ids: list[int], params: list[SamplingParams]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.context:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens but the context is {self.context} "
                                f"(room is needed for at least one new token); shorten the prompt")
        vocab = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        if not 1 <= len(params) <= self.max_batch:
            raise UserError(f"n must be between 1 and {self.max_batch} (got {len(params)})")
        too_many = max(p.max_new_tokens for p in params)
        if too_many > self.max_tokens_cap:
            raise UserError(f"max_tokens is {too_many} but this server allows at most {self.max_tokens_cap}")

    # ---- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._schedule():
                    self._run_calls()
                    events: list[tuple[Request, TokenEvent | BaseException]] = []
                    self._prefill_some(events)
                    self._decode(events)
                    self._post(events)
        finally:  # closing, or a bug in the loop itself: no consumer may be left waiting forever
            with self._cond:
                self._closing = True
            self._post(self._abandon_all())

    def _schedule(self) -> bool:
        """Drop cancelled work, admit waiting requests into free slots; sleep while idle.
        False once the scheduler is closing."""
        with self._cond:
            while not self._closing:
                self._running = [s for s in self._running if s.index not in s.request.cancelled]
                self._prefilling = [j for j in self._prefilling if len(j.request.cancelled) < j.request.n]
                used = len(self._running) + sum(job.request.n for job in self._prefilling)
                while self._waiting and used + self._waiting[0].n <= self.max_batch:
                    request = self._waiting.popleft()
                    ids_1T = torch.tensor([request.prompt_ids], device=self.model.tok_emb.weight.device)
                    self._prefilling.append(_Prefill(request, ids_1T, self.model.new_cache()))
                    used += request.n
                if self._running or self._prefilling or self._calls:
                    return True
                self._cond.wait()
            return False

    def _run_calls(self) -> None:
        """Work that needs the model but is not decoding (scoring a prompt), run between passes."""
        with self._cond:
            calls, self._calls = list(self._calls), deque()
        for fn, future, adapter in calls:
            if future.set_running_or_notify_cancel():
                try:
                    self._use(adapter)
                    future.set_result(fn(self.model))
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    future.set_exception(exc)

    def _prefill_some(self, events: list) -> None:
        """Prefill chunks until about `prefill_chunk` tokens have gone through in this pass, so a
        long prompt delays the running batch by at most one chunk per decode step."""
        budget = self.prefill_chunk
        for job in list(self._prefilling):
            if budget <= 0:
                return
            try:
                self._use(job.request.adapter)  # the prefix cache holds base-model blocks only
                budget -= job.step(self.model, self.prefill_chunk, None if job.request.adapter else self.prefix)
                sequences = self._start_choices(job, events) if job.complete else None
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the server down
                events.append((job.request, exc))
                sequences = []
            if sequences is not None:
                with self._cond:
                    self._prefilling.remove(job)
                    self._running += [s for s in sequences if not s.finished]

    def _start_choices(self, job: _Prefill, events: list) -> list[_Sequence]:
        """The prompt is in the cache: fork it per choice and sample each choice's first token."""
        request, sequences = job.request, []
        logits_V = job.logits_V.cpu()
        for index, params in enumerate(request.params):
            if index in request.cancelled:
                continue
            cache = job.cache if not sequences else copy.deepcopy(job.cache)
            seen = list(request.prompt_ids) if params.uses_history else []
            sequence = _Sequence(request, index, cache, sampling_generator(params.seed), seen,
                                 params.grammar.matcher() if params.grammar is not None else None)
            events.append((request, self._sample(sequence, logits_V)))
            sequences.append(sequence)
        return sequences

    def _decode(self, events: list) -> None:
        """One batched decode step over every running sequence."""
        batch = self._running
        if not batch:
            return
        try:
            logits_BV = self._decode_rows(batch)
        except Exception as exc:  # noqa: BLE001 - the consumers get the error; the scheduler keeps serving
            events += [(request, exc) for request in {s.request: None for s in batch}]
            for s in batch:
                s.finished = True
        else:
            for sequence, logits_V in zip(batch, logits_BV):
                try:
                    events.append((sequence.request, self._sample(sequence, logits_V)))
                except Exception as exc:  # noqa: BLE001 - a grammar refusing a token ends its request alone
                    events.append((sequence.request, exc))
                    sequence.finished = True
        with self._cond:
            self._last_batch = len(batch)
            self._running = [s for s in self._running if not s.finished]

    def _decode_rows(self, batch: list[_Sequence]) -> torch.Tensor:
        """Next-token logits (B, vocab) of the batch: one decode_rows call per adapter in it, so a
        batch mixing k adapters costs k weight passes (the base model's requests share one)."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for row, sequence in enumerate(batch):
            groups[sequence.request.adapter].append(row)
        if len(groups) == 1:
            self._use(batch[0].request.adapter)
            return self.model.decode_rows([s.last for s in batch], [s.cache for s in batch]).cpu()
        logits_BV = torch.empty(len(batch), self.model.cfg.vocab_size)
        for adapter, rows in groups.items():
            self._use(adapter)
            logits_BV[rows] = self.model.decode_rows([batch[r].last for r in rows],
                                                     [batch[r].cache for r in rows]).cpu().float()
        return logits_BV

    def _use(self, adapter: str | None) -> None:
        if self._adapter_layers:
            use_adapter(self._adapter_layers, adapter)

    def _sample(self, sequence: _Sequence, logits_V: torch.Tensor) -> TokenEvent:
        params = sequence.request.params[sequence.index]
        history = torch.tensor(sequence.seen, dtype=torch.long) if params.uses_history else _NO_IDS
        allowed_V = sequence.matcher.allowed() if sequence.matcher is not None else None
        token = choose_token(logits_V, params, history, sequence.generator, len(sequence.request.prompt_ids), allowed_V)
        if sequence.matcher is not None and token not in sequence.request.stop_ids:
            sequence.matcher.accept(token)
        if params.uses_history:
            sequence.seen.append(token)
        sequence.produced += 1
        sequence.last = token
        finish = None
        if token in sequence.request.stop_ids:
            finish = "stop"
        elif sequence.produced >= params.max_new_tokens or sequence.cache[0].length >= self.context:
            finish = "length"
        sequence.finished = finish is not None
        self._tokens += 1
        if params.top_logprobs is None:
            return TokenEvent(sequence.index, token, finish)
        logprob, top = token_logprobs(logits_V, token, params.top_logprobs)
        return TokenEvent(sequence.index, token, finish, logprob, top)

    def _post(self, events: list[tuple[Request, TokenEvent | BaseException]]) -> None:
        """Hand events to each request's event loop, one wake-up per loop per pass."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request, item in events:
            by_loop[request.loop].append((request, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for request, _ in batch:
                    self.cancel(request)

    def _abandon_all(self) -> list[tuple[Request, BaseException]]:
        with self._cond:
            requests = {job.request: None for job in self._prefilling}
            requests.update({s.request: None for s in self._running})
            requests.update({r: None for r in self._waiting})
            self._waiting.clear()
            self._prefilling, self._running = [], []
            calls, self._calls = list(self._calls), deque()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the server is shutting down"))
        return [(request, RuntimeError("the server is shutting down")) for request in requests]


def _deliver(batch: list[tuple[Request, TokenEvent | BaseException]]) -> None:
    for request, item in batch:
        request.events.put_nowait(item)
