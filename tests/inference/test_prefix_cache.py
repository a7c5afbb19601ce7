"""The prefix cache: a prompt restored from cached blocks prefills to bit-identical logits and
caches, requests with shared and diverging prefixes decode exactly the tokens they decode without
it (interleaved in one running batch), and memory stays within budget by evicting the least
recently used blocks, the ends of prefixes before the blocks they extend."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hybridlm.errors import UserError
from hybridlm.inference.prefix_cache import PrefixCache, block_keys
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.scheduler import Scheduler
from hybridlm.model.kv_cache import DenseKVCache

from test_scheduler import CHUNK, collect, make_model, prompt, run_engine


@pytest.fixture(scope="module")
def model():
    return make_model()


def chunked_prefill(model, ids: list[int], prefix: PrefixCache | None) -> tuple[torch.Tensor, list, int]:
    """Last-position logits, caches and restored length of a prefill in CHUNK-token chunks, as the
    scheduler runs it (storing each full chunk when there is a prefix cache)."""
    cache = model.new_cache()
    restored = prefix.restore(ids, cache) if prefix is not None else 0
    with torch.inference_mode():
        for start in range(restored, len(ids), CHUNK):
            end = min(start + CHUNK, len(ids))
            logits_V = model(torch.tensor([ids[start:end]]), cache)[0, -1]
            if prefix is not None and end % CHUNK == 0:
                prefix.store(ids, cache, end)
    return logits_V, cache, restored


def layer_state(cache) -> list[torch.Tensor]:
    if isinstance(cache, DenseKVCache):
        return [cache.k_BHSD[:, :, : cache.length], cache.v_BHSD[:, :, : cache.length]]
    return [t for t in (cache.run_k, cache.run_v, cache.far_k, cache.far_v) if t is not None] + [
        torch.tensor([cache.length, cache.run_start])]


def test_restored_prefix_prefills_to_bit_identical_logits_and_caches(model):
    prefix = PrefixCache(CHUNK, 1 << 24)
    shared = prompt(70)
    chunked_prefill(model, shared[:50], prefix)  # stores blocks 1-3 (48 tokens)
    for ids, expect_restored in ((shared, 48), (shared[:48], 32), (shared[:40] + prompt(30, 5), 32),
                                 (prompt(60, 9), 0)):
        reference_V, reference_cache, _ = chunked_prefill(model, ids, None)
        logits_V, cache, restored = chunked_prefill(model, ids, prefix)
        assert restored == expect_restored  # at least one token is left to prefill; a diverging block is a miss
        assert torch.equal(logits_V, reference_V)
        for ours, theirs in zip(cache, reference_cache):
            assert all(torch.equal(a, b) for a, b in zip(layer_state(ours), layer_state(theirs), strict=True))
    stats = prefix.stats()
    assert stats["lookups"] == 5 and stats["hits"] == 3 and stats["tokens_saved"] == 48 + 32 + 32


def test_shared_and_diverging_prefixes_decode_the_same_tokens_with_and_without_the_cache(model):
    system = prompt(53, 2)
    prompts = [system + prompt(9, 1), system[:37] + prompt(20, 4), system + prompt(30, 7), prompt(41, 3),
               system + prompt(9, 1)]
    params = [SamplingParams(max_new_tokens=25, temperature=0), SamplingParams(max_new_tokens=30, temperature=0.9,
              seed=3, top_logprobs=2), SamplingParams(max_new_tokens=20, temperature=0),
              SamplingParams(max_new_tokens=25, temperature=1.0, top_k=20, seed=8),
              SamplingParams(max_new_tokens=15, temperature=0, top_logprobs=0)]

    async def interleaved(engine: Scheduler):
        async def one(i: int):
            await asyncio.sleep(0.01 * i)
            request = engine.submit(prompts[i], [params[i]])
            events = []
            while not events or events[-1].finish is None:
                events.append(await request.next_event())
            return [(e.token, e.logprob) for e in events]
        return await asyncio.gather(*(one(i) for i in range(len(prompts)))), engine.stats()

    async def sequential(engine: Scheduler):
        return [(await collect(engine.submit(p, [q])))[0][0] for p, q in zip(prompts, params)], engine.stats()

    cached, _ = run_engine(model, interleaved, max_batch=4, prefix_cache_bytes=1 << 24)
    uncached, off = run_engine(model, interleaved, max_batch=4)
    assert [[t for t, _ in reply] for reply in cached] == [[t for t, _ in reply] for reply in uncached]
    for ours, theirs in zip(cached, uncached):
        torch.testing.assert_close([lp for _, lp in ours], [lp for _, lp in theirs], rtol=0, atol=1e-5)
    assert off["prefix_cache"] is None
    alone, stats = run_engine(model, sequential, max_batch=1, prefix_cache_bytes=1 << 24)
    assert alone == [[t for t, _ in reply] for reply in uncached]
    # One at a time, each prompt finds what the earlier ones stored: 48 shared tokens for prompts
    # 2, 3 and 5 (prompt 2 diverges at 37, so only its first two blocks match).
    assert stats["prefix_cache"]["hits"] == 3 and stats["prefix_cache"]["tokens_saved"] == 32 + 48 + 48


def test_eviction_keeps_within_budget_and_drops_the_ends_of_prefixes_first(model):
    probe = PrefixCache(CHUNK, 1 << 24)
    chunked_prefill(model, prompt(33, 1), probe)
    two_blocks = probe.bytes
    chunked_prefill(model, prompt(17, 2), probe)
    one_block = probe.bytes - two_blocks

    prefix = PrefixCache(CHUNK, two_blocks + one_block - 1)
    chunked_prefill(model, prompt(33, 1), prefix)  # P: blocks P1, P2
    assert chunked_prefill(model, prompt(33, 1), prefix)[2] == 32
    chunked_prefill(model, prompt(17, 2), prefix)  # Q1 does not fit beside both: one block goes
    stats = prefix.stats()
    assert stats["evictions"] == 1 and stats["bytes"] <= prefix.budget and stats["entries"] == 2
    assert chunked_prefill(model, prompt(17, 2), prefix)[2] == 16
    assert chunked_prefill(model, prompt(33, 1), prefix)[2] == 16  # P2 went, P1 stayed
    # That prefill stored P2 again: the least recently used block (Q1) made room for it.
    assert prefix.stats()["evictions"] == 2 and chunked_prefill(model, prompt(17, 2), prefix)[2] == 0
    tiny = PrefixCache(CHUNK, 1)
    chunked_prefill(model, prompt(33, 1), tiny)  # a block larger than the whole budget is not kept
    assert tiny.stats()["entries"] == 0 and tiny.bytes == 0


def test_block_keys_name_the_whole_prefix_and_bad_settings_are_refused():
    a, b = prompt(40), prompt(16, 3) + prompt(40)[16:]
    keys_a, keys_b = block_keys(a, 16), block_keys(b, 16)
    assert len(keys_a) == 2 and keys_a[0] != keys_b[0]
    assert keys_a[1] != keys_b[1]  # the same second block after a different first one is another prefix
    with pytest.raises(UserError, match="budget"):
        PrefixCache(16, 0)
    with pytest.raises(UserError, match="prefix_cache_bytes"):
        Scheduler(make_model(), prefix_cache_bytes=-1)
