"""The token engine: chunked prefill and batched samples agree with plain one-sequence decoding."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids, generate_samples
from hybridlm.inference.sampling import SamplingParams
from hybridlm.model import HybridLM


@pytest.fixture(scope="module")
def model() -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=3, n_head=4, d_model=32, max_seq_len=200, layer_pattern="DSS",
                      window=8, stride=5, n_global=2)
    return HybridLM(cfg).eval()


PROMPT = list(range(3, 60))


def test_chunked_prefill_gives_the_same_tokens(model):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    whole = list(generate_ids(model, PROMPT, params, eos_id=None))
    chunked = list(generate_ids(model, PROMPT, params, eos_id=None, prefill_chunk=7))
    assert chunked == whole and len(whole) == 40


def test_batched_samples_match_single_sequence_decoding(model):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=20, seed=11)
    samples = generate_samples(model, PROMPT, params, n=3, eos_id=None)
    for i, sample in enumerate(samples):
        one = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=20, seed=11 + i)
        assert sample == list(generate_ids(model, PROMPT, one, eos_id=None))
    assert len({tuple(s) for s in samples}) > 1  # different seeds, different samples


def test_samples_stop_at_eos_independently(model):
    greedy = list(generate_ids(model, PROMPT, SamplingParams(max_new_tokens=10, temperature=0), eos_id=None))
    eos = greedy[3]
    samples = generate_samples(model, PROMPT, SamplingParams(max_new_tokens=10, temperature=0), n=2, eos_id=eos)
    assert samples == [greedy[: greedy.index(eos) + 1]] * 2


def test_bad_requests(model):
    with pytest.raises(UserError, match="n must be > 0"):
        generate_samples(model, PROMPT, SamplingParams(), n=0, eos_id=None)
    with pytest.raises(UserError, match="shorten the prompt"):
        list(generate_ids(model, list(range(200)), SamplingParams(), eos_id=None))
