"""Sampling rules and stop-string streaming."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.errors import UserError
from hybridlm.inference.sampling import SamplingParams, choose_token
from hybridlm.inference.text import stream_text
from hybridlm.tokenizer import train_tokenizer

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])
NONE = torch.tensor([], dtype=torch.long)


def _draws(params: SamplingParams, seen=NONE, n=300) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {choose_token(LOGITS, params, seen, gen) for _ in range(n)}


def test_greedy_and_top_k_1_pick_the_argmax():
    assert _draws(SamplingParams(temperature=0)) == {1}
    assert _draws(SamplingParams(temperature=1.0, top_k=1)) == {1}


def test_top_k_and_top_p_restrict_the_support():
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {1, 2}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5)) == {1}  # p(1) ~ 0.52 alone reaches 0.5
    assert _draws(SamplingParams(temperature=5.0), n=2000) == {0, 1, 2, 3, 4}


def test_repetition_penalty_demotes_seen_tokens():
    assert _draws(SamplingParams(temperature=0, repetition_penalty=2.0), seen=torch.tensor([1])) == {2}


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0)
    a = [choose_token(LOGITS, params, NONE, torch.Generator().manual_seed(5)) for _ in range(1)]
    b = [choose_token(LOGITS, params, NONE, torch.Generator().manual_seed(5)) for _ in range(1)]
    assert a == b


def test_invalid_params():
    with pytest.raises(UserError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(UserError):
        SamplingParams(top_p=0)


def test_stream_stops_at_stop_string_and_never_leaks_it():
    tok = train_tokenizer(["hello world. STOP here. more text"] * 10, vocab_size=300)
    ids = tok.encode("hello world. STOP here. more text")
    pieces = list(stream_text(tok, ids, stop=("STOP",)))
    assert "".join(pieces) == "hello world. "
    assert all("S" not in p for p in pieces)
    assert "".join(stream_text(tok, ids)) == "hello world. STOP here. more text"


def test_a_subnormal_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    params = SamplingParams(temperature=5e-324, seed=0)
    assert choose_token(logits, params, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(0)) == 1


_STREAM_TOKENIZERS: dict = {}


def _stream_tokenizer(kind: str):
    """A byte-level tokenizer (BPE or Unigram) trained on text with multi-byte characters, so ids
    can split a character and carry special tokens."""
    if kind not in _STREAM_TOKENIZERS:
        text = ["naïve café 😀 über straße — “quoted” 中文字符 hello world. STOP here.\n\n"] * 20
        _STREAM_TOKENIZERS[kind] = train_tokenizer(text, kind=kind, vocab_size=300)
    return _STREAM_TOKENIZERS[kind]


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["bpe", "unigram"]), data=st.data())
def test_incremental_stream_equals_one_decode_of_all_ids(kind, data):
    """Whatever the ids (parts of characters, special tokens, invalid bytes), the pieces joined
    are the text one decode of all the ids gives, less the U+FFFD that stand for bytes forming no
    character: up to the first stop string, or all of it."""
    tok = _stream_tokenizer(kind)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=80))
    stop = data.draw(st.sampled_from([(), ("STOP",), ("é", "\n\n")]))
    pieces = list(stream_text(tok, ids, stop=stop))
    whole = tok.decode(ids).replace("\ufffd", "")
    hits = [whole.find(s) for s in stop if s in whole]
    assert "".join(pieces) == (whole[: min(hits)] if hits else whole)


def test_bias_and_penalties_match_a_hand_computation():
    """logit_bias, then the repetition penalty over prompt + output, then presence and frequency
    penalties over the output only, on a fixed logit vector."""
    from hybridlm.inference.sampling import adjusted_logits

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    seen = torch.tensor([4, 2, 2, 0])  # prompt [4], output [2, 2, 0]
    params = SamplingParams(logit_bias=((1, 5.0), (3, -2.0)), repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    biased = [2.0, 4.0, 0.5, 1.0, 1.0]
    repeated = [biased[0] / 2, biased[1], biased[2] / 2, biased[3], biased[4] / 2]  # ids 0, 2, 4 were seen
    counts = [1, 0, 2, 0, 0]  # in the output; id 4 is only in the prompt
    expected = [r - 0.25 * c - 0.5 * (c > 0) for r, c in zip(repeated, counts)]
    assert adjusted_logits(logits, params, seen, n_prompt=1).tolist() == pytest.approx(expected)
    assert adjusted_logits(logits, SamplingParams(), seen, 1).tolist() == logits.tolist()  # defaults: unchanged
    greedy = SamplingParams(temperature=0, logit_bias=((1, 5.0),))
    assert choose_token(logits, greedy, NONE, torch.Generator()) == 1  # the bias moved the argmax


def test_min_p_keeps_only_tokens_near_the_most_likely():
    # probabilities at T = 1: softmax([1, 3, 2.5, -1, 0]) ~ [0.07, 0.52, 0.32, 0.01, 0.03]
    assert _draws(SamplingParams(temperature=1.0, min_p=0.5), n=500) == {1, 2}  # 0.32 >= 0.5 * 0.52
    assert _draws(SamplingParams(temperature=1.0, min_p=0.7), n=500) == {1}


@pytest.mark.parametrize("bad", [{"min_p": 1.5}, {"presence_penalty": 3.0}, {"frequency_penalty": -2.5},
                                 {"logit_bias": ((1, 101.0),)}, {"repetition_penalty": 5e-324},
                                 {"repetition_penalty": 0.0}])
def test_out_of_range_sampling_controls_are_refused(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)
