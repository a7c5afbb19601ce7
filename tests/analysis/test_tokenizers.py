"""`analyze tokenizer`: the held-out split, each figure recomputed from an independently trained
tokenizer (training is deterministic), larger vocabularies giving longer tokens, a model trained
per tokenizer, and bad input."""

from __future__ import annotations

import json

import pytest
from e2e.test_cli import hybridlm

from hybridlm.analysis.tokenizers import compare_tokenizers, split_corpus
from hybridlm.tokenizer import train_tokenizer

PARAGRAPHS = [f"Paragraph {k}: the value of x{k} is {k * 7}, and the next is {k + 1}." for k in range(120)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS))
    return path


def test_figures_follow_the_tokenizers(corpus):
    train, held_out = split_corpus([str(corpus)])
    assert held_out == PARAGRAPHS[9::10] and len(train) == 108 and not set(train) & set(held_out)
    document = compare_tokenizers([str(corpus)], [300, 360], ("bpe", "unigram"))
    assert [(r["kind"], r["requested_vocab"]) for r in document["rows"]] == [
        ("bpe", 300), ("bpe", 360), ("unigram", 300), ("unigram", 360)]
    for row in document["rows"]:
        tokenizer = train_tokenizer(train, kind=row["kind"], vocab_size=row["requested_vocab"])
        ids = [tokenizer.encode(text) for text in held_out]
        tokens = sum(map(len, ids))
        assert row["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in held_out) / tokens)
        assert row["tokens_per_word"] == pytest.approx(tokens / sum(len(t.split()) for t in held_out))
        assert row["vocab_used"] == pytest.approx(len({i for r in ids for i in r}) / tokenizer.vocab_size)
        assert row["encode_mb_s"] > 0
    bpe_small, bpe_large = document["rows"][:2]
    assert bpe_large["bytes_per_token"] > bpe_small["bytes_per_token"]



def test_train_scores_each_tokenizer_in_bits_per_byte(corpus):
    result = hybridlm("analyze", "tokenizer", str(corpus), "--vocab-sizes", "300", "--kinds", "bpe", "--train",
                      "--train-steps", "3", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert 0 < row["val_bpb"] < 20


@pytest.mark.parametrize(("args", "words"), [
    (["--kinds", "wordpiece"], "--kinds must name some of bpe, unigram"),
    (["--vocab-sizes", "big"], "--vocab-sizes must be comma-separated integers"),
    (["--vocab-sizes", "100"], "vocab size 100 is too small"),
])
def test_bad_input_is_one_line(corpus, args, words):
    result = hybridlm("analyze", "tokenizer", str(corpus), *args)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_corpus_too_small_to_hold_out(tmp_path):
    (tmp_path / "small.txt").write_text("one\n\ntwo")
    result = hybridlm("analyze", "tokenizer", str(tmp_path / "small.txt"))
    assert result.returncode == 2 and "at least 10 to hold one out" in result.stderr
