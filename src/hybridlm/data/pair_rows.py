"""Preference pairs as training rows: both replies after the same rendered prompt, padded to one
length, with the positions a reward head reads and the targets a log-probability sums over.

A row holds (ids (2, T), targets (2, T), last (2,)), chosen first, and, when the reference
log-probabilities are known (DPO), ref (2,). targets[i] = ids[i + 1] where that token belongs to
the reply, IGNORE_INDEX elsewhere; last is the index of each side's last real token (the reply's
end marker, where a reward model reads its score). A prompt too long for the row loses its oldest
tokens first, keeping at least half the row when the reply is long.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hybridlm.data.preferences import PreferencePair
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.chat import render_chat


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    """The rendered prompt up to and including the assistant marker."""
    chosen: list[int]
    """Reply tokens and the end marker."""
    rejected: list[int]


def encode_pairs(tokenizer: TextTokenizer, pairs: list[PreferencePair]) -> list[EncodedPair]:
    end = tokenizer.special_ids["end"]
    return [EncodedPair(render_chat(tokenizer, list(p.prompt), add_generation_prompt=True)[0],
                        tokenizer.encode(p.chosen) + [end], tokenizer.encode(p.rejected) + [end]) for p in pairs]


def side_row(prompt: list[int], reply: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, targets, last index) of one reply after its prompt, in seq_len columns."""
    keep = max(seq_len - len(reply), min(len(prompt), seq_len // 2))
    prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
    ids = (prompt + reply)[:seq_len]
    x = np.full(seq_len, pad_id, dtype=np.int64)
    y = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    x[: len(ids)] = ids
    first = len(prompt) - 1  # the position that predicts the reply's first token
    y[first : len(ids) - 1] = ids[first + 1 :]
    return x, y, len(ids) - 1


def pair_row(pair: EncodedPair, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sides = [side_row(pair.prompt, reply, seq_len, pad_id) for reply in (pair.chosen, pair.rejected)]
    x, y, last = zip(*sides)
    return np.stack(x), np.stack(y), np.array(last, dtype=np.int64)


class PairSource:
    """Rows of randomly drawn pairs (a RowSource for data/mixture.py), with their reference
    log-probabilities (N, 2) when given."""

    def __init__(self, pairs: list[EncodedPair], pad_id: int, reference: np.ndarray | None = None) -> None:
        self.pairs, self.pad_id, self.reference = pairs, pad_id, reference

    def draw(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, ...]:
        index = int(rng.integers(0, len(self.pairs)))
        row = pair_row(self.pairs[index], seq_len, self.pad_id)
        return row if self.reference is None else (*row, self.reference[index])


def pair_batches(pairs: list[EncodedPair], seq_len: int, pad_id: int, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(ids (B, 2, T), targets (B, 2, T), last (B, 2)) tensors of consecutive pairs, `size` at a time."""
    for start in range(0, len(pairs), size):
        rows = [pair_row(p, seq_len, pad_id) for p in pairs[start : start + size]]
        yield tuple(torch.from_numpy(np.stack(part)) for part in zip(*rows))
