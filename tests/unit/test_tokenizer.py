"""Tokenizer training and exact round trips for any Unicode text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_file
from hybridlm.errors import UserError
from hybridlm.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "def f(x):\n    return x + 1\n", "naïve café ünïcödé"] * 20


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request):
    return train_tokenizer(CORPUS, kind=request.param, vocab_size=400)


def test_round_trip_on_utf8_demo(tokenizer):
    text = shared_file("tokenizer/UTF-8-demo.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned and used


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_on_random_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_in_text_stay_text(tokenizer):
    text = "a <|eos|> b <|user|>"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text


def test_save_and_load(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.encode("hello world") == tokenizer.encode("hello world")
    assert loaded.special_ids == tokenizer.special_ids
    assert set(loaded.special_ids) == set(SPECIAL_TOKENS)


def test_vocab_too_small_for_special_tokens():
    with pytest.raises(UserError, match="too small: it needs at least 264"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_empty_corpus():
    with pytest.raises(UserError, match="empty"):
        train_tokenizer(["", ""], vocab_size=300)


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path / "tokenizer.json")
