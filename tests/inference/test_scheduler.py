"""The continuous-batching engine: a batched decode step equals single-sequence decoding, requests
that join and leave a running batch get exactly the tokens they get alone (and that
inference/decode.py's own decode gives), cancellation frees slots, and the queue is bounded."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.model import HybridLM
from hybridlm.model.kv_cache import SparseKVCache
from hybridlm.inference.scheduler import Scheduler, PromptTooLong, QueueFull, Request

WINDOW, STRIDE, CHUNK = 8, 5, 16


def make_model(position: str = "rope", **fields) -> HybridLM:
    """Dense + sparse layers, grouped-query attention, a window and stride short enough that the
    sparse caches roll and keep strided keys within a few dozen tokens; fp32. The weights are
    pushed away from the initial ones (an untied head, sharper attention): a freshly initialised
    tied model greedily repeats its last token whatever the cache holds, which would prove nothing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=256,
                      layer_pattern="DSS", window=WINDOW, stride=STRIDE, n_global=2, position=position,
                      tie_embeddings=False, **fields)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> HybridLM:
    return make_model()


def prompt(length: int, offset: int = 0) -> list[int]:
    return [(7 * i + offset) % 90 + 3 for i in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0)


async def collect(request: Request) -> tuple[list[list[int]], list[str | None]]:
    """Every choice's tokens and finish reason."""
    tokens: list[list[int]] = [[] for _ in range(request.n)]
    finishes: list[str | None] = [None] * request.n
    try:
        while None in finishes:
            event = await request.next_event()
            tokens[event.index].append(event.token)
            finishes[event.index] = event.finish
    finally:
        request.cancel()
    return tokens, finishes


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def run_engine(model: HybridLM, body, **options) -> object:
    """Run `body(engine)` on a started engine inside a real event loop; close it afterwards."""
    async def main():
        engine = Scheduler(model, prefill_chunk=CHUNK, **options)
        engine.start()
        try:
            return await body(engine)
        finally:
            await asyncio.to_thread(engine.close)
    return asyncio.run(main())


MOE = {"ffn": "moe", "n_experts": 4, "top_k": 2, "n_shared_experts": 1, "moe_pattern": "MFM"}


@pytest.mark.parametrize("position,fields", [("rope", {}), ("learned", {}), ("sinusoidal", {}), ("rope", MOE)])
def test_batched_decode_step_equals_single_sequence_forward(position, fields):
    model = make_model(position, **fields)
    prompts = [prompt(n, n) for n in (3, 12, 29, 50)]
    with torch.inference_mode():
        batched, alone = [model.new_cache() for _ in prompts], [model.new_cache() for _ in prompts]
        for ids, cache_b, cache_a in zip(prompts, batched, alone):
            model(torch.tensor([ids]), cache_b)
            model(torch.tensor([ids]), cache_a)
        tokens = [ids[-1] for ids in prompts]
        for _ in range(20):
            logits_BV = model.decode_rows(tokens, batched)
            for b, token in enumerate(tokens):
                reference_V = model(torch.tensor([[token]]), alone[b])[0, -1]
                torch.testing.assert_close(logits_BV[b], reference_V, rtol=1e-4, atol=1e-4)
            tokens = logits_BV.argmax(-1).tolist()
        # A batch of one takes exactly the model's own path: bit-identical logits. (Wider batches
        # differ in the last bits only: the BLAS sums an M=B matmul in another order than M=1.)
        single = model.decode_rows(tokens[:1], [copy.deepcopy(alone[0])])[0]
        assert torch.equal(single, model(torch.tensor([[tokens[0]]]), alone[0])[0, -1])
    sparse = batched[3][1]
    assert isinstance(sparse, SparseKVCache) and sparse.length == 50 + 20
    assert sparse.run_k.shape[2] == WINDOW - 1 and sparse.far_k is not None  # the cache rolled
    assert batched[3][0].length == 50 + 20  # the dense layer keeps everything


PROMPT_LENGTHS = (3, 11, 40, 70, 25)  # 40 and 70 are prefilled in chunks of CHUNK
MAX_TOKENS = (60, 30, 45, 20, 50)


def test_requests_joining_a_running_batch_decode_as_they_would_alone(model):
    prompts = [prompt(n, i) for i, n in enumerate(PROMPT_LENGTHS)]
    reference = [list(generate_ids(model, p, greedy(m), eos_id=None, prefill_chunk=CHUNK))
                 for p, m in zip(prompts, MAX_TOKENS)]

    async def staggered(engine: Scheduler):
        widest = 0

        async def arrive(i: int):
            await until(lambda: engine.stats()["tokens_generated"] >= 6 * i)  # join a running batch
            return (await collect(engine.submit(prompts[i], [greedy(MAX_TOKENS[i])])))[0][0]

        async def watch():
            nonlocal widest
            while True:
                widest = max(widest, engine.stats()["batch_size"])
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        outputs = await asyncio.gather(*(arrive(i) for i in range(len(prompts))))
        watcher.cancel()
        return outputs, widest, engine.stats()

    async def one_at_a_time(engine: Scheduler):
        return [(await collect(engine.submit(p, [greedy(m)])))[0][0] for p, m in zip(prompts, MAX_TOKENS)]

    batched, widest, stats = run_engine(model, staggered, max_batch=4)
    sequential = run_engine(model, one_at_a_time, max_batch=1)
    assert batched == sequential == reference
    assert all(len(set(tokens)) > 10 for tokens in reference)  # context-dependent output, not a loop
    assert widest >= 3  # requests really shared decode steps
    assert stats["active_sequences"] == 0 and stats["queue_depth"] == 0
    assert stats["tokens_generated"] == sum(MAX_TOKENS)


def test_a_mixture_of_experts_model_decodes_in_a_running_batch_as_alone():
    moe = make_model(**MOE)
    prompts = [prompt(n, i) for i, n in enumerate(PROMPT_LENGTHS)]
    reference = [list(generate_ids(moe, p, greedy(m), eos_id=None, prefill_chunk=CHUNK))
                 for p, m in zip(prompts, MAX_TOKENS)]

    async def together(engine: Scheduler):
        return [r[0][0] for r in await asyncio.gather(*(collect(engine.submit(p, [greedy(m)]))
                                                       for p, m in zip(prompts, MAX_TOKENS)))]

    assert run_engine(moe, together, max_batch=4) == reference


def test_seeded_choices_are_reproducible_and_match_single_sequence_sampling(model):
    ids = prompt(21)
    params = [SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=5 + i) for i in range(3)]

    async def twice(engine: Scheduler):
        first = await collect(engine.submit(ids, params))
        second = await collect(engine.submit(ids, params))
        return first[0], second[0]

    first, second = run_engine(model, twice, max_batch=4)
    assert first == second
    assert len({tuple(choice) for choice in first}) > 1  # different seeds, different samples
    for choice, p in zip(first, params):
        assert choice == list(generate_ids(model, ids, p, eos_id=None, prefill_chunk=CHUNK))


def test_stop_token_ends_a_choice(model):
    ids = prompt(15)
    full = list(generate_ids(model, ids, greedy(30), eos_id=None))
    stop = full[6]

    async def body(engine: Scheduler):
        return await collect(engine.submit(ids, [greedy(30)], frozenset({stop})))

    (tokens,), (finish,) = run_engine(model, body)
    assert tokens == full[: full.index(stop) + 1] and finish == "stop"
    (tokens,), (finish,) = run_engine(model, lambda e: collect(e.submit(ids, [greedy(30)])))
    assert tokens == full and finish == "length"


def test_cancelled_request_frees_its_slot_while_others_continue(model):
    long_prompt, other_prompt = prompt(9), prompt(33, 1)
    reference = list(generate_ids(model, other_prompt, greedy(40), eos_id=None, prefill_chunk=CHUNK))

    async def body(engine: Scheduler):
        doomed = engine.submit(long_prompt, [greedy(200)])
        other = asyncio.create_task(collect(engine.submit(other_prompt, [greedy(40)])))
        for _ in range(3):
            await doomed.next_event()
        doomed.cancel()
        await until(lambda: engine.stats()["active_sequences"] <= 1)
        output = (await other)[0][0]
        await until(lambda: engine.stats()["active_sequences"] == 0)
        return output, engine.stats()

    output, stats = run_engine(model, body, max_batch=4)
    assert output == reference
    assert stats["queue_depth"] == 0
    assert stats["tokens_generated"] < 40 + 100  # the cancelled request stopped long before its 200


def test_queue_is_bounded_and_a_freed_slot_admits_the_next_request(model):
    waiting_prompt = prompt(12, 3)
    reference = list(generate_ids(model, waiting_prompt, greedy(10), eos_id=None))

    async def body(engine: Scheduler):
        running = engine.submit(prompt(5), [greedy(200)])
        await running.next_event()  # admitted: the only slot is taken
        dropped = engine.submit(prompt(7), [greedy(10)])
        assert engine.stats()["queue_depth"] == 1
        with pytest.raises(QueueFull):
            engine.submit(prompt(8), [greedy(10)])
        dropped.cancel()  # a waiting request leaves the queue at once
        assert engine.stats()["queue_depth"] == 0
        waiting = asyncio.create_task(collect(engine.submit(waiting_prompt, [greedy(10)])))
        await until(lambda: engine.stats()["queue_depth"] == 1)
        running.cancel()  # frees the slot: the waiting request is admitted
        output = (await waiting)[0][0]
        await until(lambda: engine.stats()["active_sequences"] == 0)
        return output, engine.stats()

    output, stats = run_engine(model, body, max_batch=1, max_queue=1)
    assert output == reference and stats["queue_depth"] == 0


def test_bad_requests_are_refused_before_queueing(model):
    async def body(engine: Scheduler):
        with pytest.raises(PromptTooLong, match="256 tokens but the context is 256"):
            engine.submit(prompt(256), [greedy(5)])
        with pytest.raises(UserError, match="at most 32"):
            engine.submit(prompt(5), [greedy(33)])
        with pytest.raises(UserError, match="n must be between 1 and 2"):
            engine.submit(prompt(5), [greedy(5)] * 3)
        with pytest.raises(UserError, match="empty"):
            engine.submit([], [greedy(5)])
        with pytest.raises(UserError, match="token ids"):
            engine.submit([3, 97], [greedy(5)])
        return engine.stats()

    assert run_engine(model, body, max_batch=2, max_tokens_cap=32)["queue_depth"] == 0


def test_closing_the_engine_ends_open_requests_with_an_error(model):
    async def body():
        engine = Scheduler(model, max_batch=1)
        engine.start()
        running = engine.submit(prompt(5), [greedy(200)])
        waiting = engine.submit(prompt(6), [greedy(5)])
        await running.next_event()
        await asyncio.to_thread(engine.close)
        with pytest.raises(RuntimeError, match="shutting down"):
            while True:
                await waiting.next_event()

    asyncio.run(body())
