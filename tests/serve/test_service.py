"""The service layer through real asyncio, on the trained tiny_run and on the untrained chatty_run
(conftest.py) whose replies run long: streamed text of concurrent requests equals one-at-a-time
and `hybridlm generate` output; n choices, seeds, stop strings, the token cap, a too-long prompt,
a full queue, and consumers that leave (their slots free at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from hybridlm.device import default_device
from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.generate import generate_text
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.text import TextStream
from hybridlm.run import LoadedRun, load_run
from hybridlm.serve.service import (
    Chunk,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    Service,
)
from hybridlm.tokenizer.chat import Message, render_chat


@pytest.fixture(scope="module")
def run(tiny_run) -> LoadedRun:
    return load_run(tiny_run)


@dataclass
class Result:
    texts: list[str]
    tokens: list[list[int]]
    finishes: list[str | None]
    order: list[int] = field(default_factory=list)
    """Choice index of every chunk, in arrival order."""


async def complete(service: Service, req: GenerationRequest) -> Result:
    result = Result([""] * req.n, [[] for _ in range(req.n)], [None] * req.n)
    async for chunk in service.stream(req):
        assert isinstance(chunk, Chunk) and result.finishes[chunk.index] is None  # nothing after a finish
        result.texts[chunk.index] += chunk.text
        result.tokens[chunk.index] += chunk.token_ids
        result.finishes[chunk.index] = chunk.finish_reason
        result.order.append(chunk.index)
    return result


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def serve(tiny_run, body, **options):
    """Run `body(service)` on a started fp32 service inside a real event loop."""
    async def main():
        service = Service(tiny_run, dtype="fp32", **options)
        await service.start()
        try:
            return await body(service)
        finally:
            await service.close()
    return asyncio.run(main())


PROMPTS = ("Paragraph 1", "Paragraph 402: the value", "the value of x7 is", "P")


@pytest.mark.parametrize(("run_name", "max_tokens"), [("tiny_run", (30, 20, 25, 40)), ("chatty_run", (64, 32, 48, 40))])
def test_concurrent_greedy_streams_equal_one_at_a_time_and_hybridlm_generate(run_name, max_tokens, request):
    run_dir = request.getfixturevalue(run_name)

    def generation(service: Service, i: int) -> GenerationRequest:
        return GenerationRequest(service.encode_prompt(PROMPTS[i]), max_tokens[i], temperature=0)

    async def concurrent(service: Service):
        widest = 0

        async def arrive(i: int) -> Result:
            nonlocal widest
            await until(lambda: service.stats()["tokens_generated"] >= 4 * i)  # join a running batch
            result = Result([""], [[]], [None])
            async for chunk in service.stream(generation(service, i)):
                widest = max(widest, service.stats()["batch_size"])
                result.texts[0] += chunk.text
                result.tokens[0] += chunk.token_ids
                result.finishes[0] = chunk.finish_reason
            return result
        results = await asyncio.gather(*(arrive(i) for i in range(len(PROMPTS))))
        return results, widest

    async def sequential(service: Service):
        return [await complete(service, generation(service, i)) for i in range(len(PROMPTS))]

    together, widest = serve(run_dir, concurrent, max_batch=8)
    alone = serve(run_dir, sequential, max_batch=1)
    run = load_run(run_dir)
    run.model.to(default_device())  # the device the service chose, so the references compare like with like
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a.texts == b.texts and a.tokens == b.tokens and a.finishes == b.finishes
        params = SamplingParams(max_new_tokens=max_tokens[i], temperature=0)
        assert a.texts[0] == "".join(generate_text(run, PROMPTS[i], params))
        prompt_ids = [run.tokenizer.eos_id, *run.tokenizer.encode(PROMPTS[i])]
        assert a.tokens[0] == list(generate_ids(run.model, prompt_ids, params, eos_id=run.tokenizer.eos_id))
    if run_name == "chatty_run":  # long replies: the requests really shared decode steps
        assert [len(r.tokens[0]) for r in together] == list(max_tokens) and widest >= 3
        assert all(len(set(r.tokens[0])) > 10 for r in together)  # context-dependent output, not a loop


def test_n_choices_interleave_and_each_matches_its_single_seeded_request(tiny_run):
    async def body(service: Service):
        ids = service.encode_prompt("Paragraph 12: the")
        many = await complete(service, GenerationRequest(ids, 40, temperature=1.0, top_p=0.95, seed=7, n=3))
        again = await complete(service, GenerationRequest(ids, 40, temperature=1.0, top_p=0.95, seed=7, n=3))
        singles = [await complete(service, GenerationRequest(ids, 40, temperature=1.0, top_p=0.95, seed=7 + i))
                   for i in range(3)]
        return many, again, singles

    many, again, singles = serve(tiny_run, body)
    assert many.texts == again.texts and many.tokens == again.tokens  # seeded: reproducible
    assert many.texts == [s.texts[0] for s in singles]
    assert many.tokens == [s.tokens[0] for s in singles]
    assert all(f in ("stop", "length") for f in many.finishes)
    assert many.order != sorted(many.order)  # chunks of the choices arrive interleaved
    assert len(set(many.texts)) > 1


def test_stop_string_cuts_the_text_where_the_full_reply_has_it(tiny_run):
    async def body(service: Service):
        ids = service.encode_prompt("Paragraph 3")
        full = await complete(service, GenerationRequest(ids, 30, temperature=0))
        stop = full.texts[0][8:12]
        return full, stop, await complete(service, GenerationRequest(ids, 30, temperature=0, stop=["zzz", stop]))

    full, stop, cut = serve(tiny_run, body)
    assert len(full.texts[0]) > 12 and full.finishes == ["stop"]  # the trained run ends at eos
    assert cut.texts[0] == full.texts[0][: full.texts[0].find(stop)] and cut.finishes == ["stop"]
    assert full.tokens[0][: len(cut.tokens[0])] == cut.tokens[0] and len(cut.tokens[0]) < len(full.tokens[0])


def test_a_stop_string_frees_the_slot_of_a_long_reply(chatty_run):
    async def body(service: Service):
        ids = service.encode_prompt("Paragraph 3")
        text = (await complete(service, GenerationRequest(ids, 30, seed=3))).texts[0]
        stop = next(text[i : i + 3] for i in range(10, len(text) - 3)
                    if text[i : i + 3].isascii() and text.find(text[i : i + 3]) == i)  # first seen at i >= 10
        before = service.stats()["tokens_generated"]
        cut = await complete(service, GenerationRequest(ids, 250, seed=3, stop=[stop]))
        await until(lambda: service.stats()["active_sequences"] == 0)
        return text, stop, cut, service.stats()["tokens_generated"] - before

    text, stop, cut, generated = serve(chatty_run, body, max_tokens_cap=250)
    assert cut.texts[0] == text[: text.find(stop)] and len(cut.texts[0]) >= 10 and cut.finishes == ["stop"]
    assert generated < 250  # the engine dropped the choice; it did not run on to max_tokens


def test_consumer_leaving_mid_stream_frees_its_slot_and_others_continue(chatty_run):
    async def body(service: Service):
        other_req = GenerationRequest(service.encode_prompt("the value of x9"), 60, temperature=0)
        reference = await complete(service, other_req)
        leaving = service.stream(GenerationRequest(service.encode_prompt("Paragraph 5"), 250, temperature=0))
        await anext(leaving)  # submitted and streaming
        other = asyncio.create_task(complete(service, other_req))
        await until(lambda: service.stats()["active_sequences"] == 2)
        await leaving.aclose()
        await until(lambda: service.stats()["active_sequences"] == 1)
        result = await other
        await until(lambda: service.stats()["active_sequences"] == 0)
        return reference, result, service.stats()

    reference, result, stats = serve(chatty_run, body, max_tokens_cap=250)
    assert result.texts == reference.texts and result.tokens == reference.tokens
    assert len(result.tokens[0]) == 60
    assert stats["queue_depth"] == 0 and stats["tokens_generated"] < 2 * 60 + 250


def test_queue_full_prompt_too_long_and_the_token_cap(chatty_run):
    async def body(service: Service):
        ids = service.encode_prompt("Paragraph 8")
        with pytest.raises(PromptTooLong, match=f"{service.context} tokens but the context is {service.context}"):
            await anext(service.stream(GenerationRequest([5] * service.context, 5)))
        for bad in (251, 0):
            with pytest.raises(UserError, match="max_tokens"):
                await anext(service.stream(GenerationRequest(ids, bad)))
        capped = await complete(service, GenerationRequest(ids, 5, temperature=0))
        assert len(capped.tokens[0]) == 5 and capped.finishes == ["length"]

        running = service.stream(GenerationRequest(ids, 250, temperature=0))
        await anext(running)  # holds the only slot
        waiting = asyncio.create_task(complete(service, GenerationRequest(ids, 5, temperature=0)))
        await until(lambda: service.stats()["queue_depth"] == 1)
        with pytest.raises(QueueFull):
            await anext(service.stream(GenerationRequest(ids, 5)))
        waiting.cancel()  # a waiting consumer that goes away leaves the queue at once
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert service.stats()["queue_depth"] == 0
        await running.aclose()
        await until(lambda: service.stats()["active_sequences"] == 0)
        return service.stats()

    stats = serve(chatty_run, body, max_batch=1, max_queue=1, max_tokens_cap=250)
    assert stats["queue_depth"] == 0 and stats["tokens_generated"] < 5 + 250
    assert set(stats) == {"queue_depth", "active_sequences", "batch_size", "tokens_generated", "prefix_cache"}


def test_prompt_encodings_and_a_chat_reply(tiny_run, run):
    tok = run.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is x3?"}]

    async def body(service: Service):
        assert service.model_id == "run" and service.context == run.model.cfg.max_seq_len
        assert service.encode_prompt("hi") == [tok.eos_id, *tok.encode("hi")]
        assert service.count_tokens("the value of x1") == len(tok.encode("the value of x1"))
        ids = service.encode_chat(messages)
        expected = render_chat(tok, [Message(**m) for m in messages], add_generation_prompt=True)[0]
        assert ids == expected and ids[-1] == tok.special_ids["assistant"]
        for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": None}]):
            with pytest.raises(UserError):
                service.encode_chat(bad)
        return await complete(service, GenerationRequest(ids, 20, temperature=0))

    reply = serve(tiny_run, body)
    assert reply.finishes[0] in ("stop", "length") and 1 <= len(reply.tokens[0]) <= 20


def test_streamed_text_holds_back_unfinished_utf8(run):
    text = "x = 'héllo ✓ 日本語' STOP after"
    ids = run.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = TextStream(run.tokenizer, ("STOP",))
    pieces = [stream.push(token) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == "x = 'héllo ✓ 日本語' "
    assert stream.stopped


def test_a_reply_cut_inside_a_character_or_with_bad_bytes_shows_no_replacement_character(run):
    """The model may stop (max_tokens) after the first byte of a character, or emit bytes that
    never form one: those bytes are dropped, never shown as U+FFFD, and the rest comes through."""
    tok = run.tokenizer
    whole = tok.encode("ok 日本")
    cut = next(n for n in range(1, len(whole)) if tok.decode(whole[:n]).endswith("\ufffd"))
    stream = TextStream(tok)
    text = "".join(stream.push(t) for t in whole[:cut]) + stream.flush()
    assert "\ufffd" not in text and text == tok.decode(whole[:cut]).replace("\ufffd", "")
    lead_byte = next(t for t in range(tok.vocab_size) if tok.decode([t]) == "\ufffd")  # a lone multi-byte lead
    stream = TextStream(tok)
    ids = [*tok.encode("a"), lead_byte, *tok.encode("b c")]
    assert "\ufffd" in tok.decode(ids)  # what a plain decode would show
    assert "".join(stream.push(t) for t in ids) + stream.flush() == "ab c"


def test_the_server_section_sizes_the_service_create_app_builds(tiny_run, tmp_path):
    """`create_app` builds its Service from config.server: the batch, queue and token cap the
    scheduler enforces are the configured ones (they used to be whatever the caller passed)."""
    from hybridlm.serve.app import create_app
    from hybridlm.serve.auth import KeyStore
    from hybridlm.serve.config import load_serve_config

    config = load_serve_config(None, ["server.max_batch=3", "server.max_queue=5", "server.max_tokens_cap=7",
                                      'server.dtype="fp32"', f'safety.review_db="{tmp_path / "review.sqlite"}"',
                                      f'audit.log="{tmp_path / "audit.jsonl"}"'])
    service = create_app(tiny_run, config, KeyStore(frozenset())).state.server.service
    scheduler = service._scheduler
    assert (scheduler.max_batch, scheduler.max_queue, scheduler.max_tokens_cap) == (3, 5, 7)
    assert service.max_tokens_cap == 7 and str(next(scheduler.model.parameters()).dtype) == "torch.float32"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_a_forward_passs_log_softmax(tiny_run, temperature):
    """Each reported log-probability (the chosen token's and the top alternatives') is the
    log_softmax of one whole forward pass over prompt + reply at that position, greedy or sampled:
    the model's own distribution, before temperature."""
    import torch

    async def body(service: Service):
        ids = service.encode_prompt("Paragraph 12: the value")
        req = GenerationRequest(ids, 20, temperature=temperature, seed=3, top_logprobs=3)
        tokens, entries = [], []
        async for chunk in service.stream(req):
            tokens += chunk.token_ids
            entries += chunk.logprobs
        return ids, tokens, entries

    prompt, tokens, entries = serve(tiny_run, body)
    assert [e.token for e in entries] == tokens and len(tokens) > 5
    model = load_run(tiny_run).model
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    for step, entry in enumerate(entries):
        row = logprobs[len(prompt) - 1 + step]
        assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
        best = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        if temperature == 0:
            assert entry.token == entry.top[0][0]
