"""METEOR by hand (NLTK's formula: F-mean with alpha 0.9, fragmentation penalty 0.5 (chunks /
matches)^3): exact matches, Porter-stem matches, and no WordNet synonyms (offline by design)."""

from __future__ import annotations

import pytest

from hybridlm.eval.tasks.metrics import meteor


def by_hand(matches: int, hyp: int, ref: int, chunks: int) -> float:
    precision, recall = matches / hyp, matches / ref
    f_mean = precision * recall / (0.9 * precision + 0.1 * recall)
    return f_mean * (1 - 0.5 * (chunks / matches) ** 3)


def test_meteor_by_hand():
    scores = meteor(["the cat sat on mat", "the dogs were running", "big house", "", "Same words here"],
                    ["the cat sat on a mat", "the dog was runs", "large house", "anything", "same Words here"])
    assert scores[0] == pytest.approx(by_hand(5, 5, 6, 2))  # "a" is missing: two chunks
    assert scores[1] == pytest.approx(by_hand(3, 4, 4, 2))  # dogs~dog and running~runs by stem
    assert scores[2] == pytest.approx(by_hand(1, 2, 2, 1))  # big/large: synonyms, not matched without WordNet
    assert scores[3] == 0.0  # an empty reply
    assert scores[4] == pytest.approx(by_hand(3, 3, 3, 1))  # case is ignored
