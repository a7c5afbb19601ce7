"""Training batches drawn from several sources in set proportions, addressed by step.

Rows are numbered globally: row r of the whole run, across micro-batches and ranks. Row r goes to
the source whose share is furthest behind its weight after r rows (largest deficit, ties to the
first source), so after any R rows every source holds within one row of weight x R: realised
shares equal the weights to 1/R. What a row contains comes from a generator keyed by (seed, r)
alone, so a resumed run, or the same global batch split over another number of ranks, draws
exactly the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from hybridlm.data.loader import TokenStream
from hybridlm.errors import UserError
from hybridlm.model.loss import IGNORE_INDEX


class RowSource(Protocol):
    def draw(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, ...]:
        """One row: (input, target) of seq_len tokens each, and any further parts an objective
        needs (a preference pair's two sides and their reference log-probs)."""


class WindowSource:
    """Causal-LM rows: random windows of a prepared split; targets are the inputs shifted by one."""

    def __init__(self, data_dir: Path, split: str, seq_len: int) -> None:
        self.stream = TokenStream(Path(data_dir), split)
        if self.stream.tokens < seq_len + 1:
            raise UserError(f"{data_dir} has {self.stream.tokens} {split} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; lower data.seq_len or add data")

    def draw(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        window = self.stream.window(int(rng.integers(0, self.stream.tokens - seq_len)), seq_len + 1)
        return window[:-1], window[1:]


class ExampleSource:
    """Instruction-tuning rows: one rendered conversation per row, right-padded to seq_len (see
    docs/architecture.md for why padding and not packing); only reply tokens are targets."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], pad_id: int) -> None:
        if not examples:
            raise UserError("the instruction source has no examples")
        self.examples, self.pad_id = examples, pad_id

    def draw(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids, trained = self.examples[int(rng.integers(0, len(self.examples)))]
        return padded_row(ids, trained, seq_len, self.pad_id)


def padded_row(ids: list[int], trained: list[bool], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one example, truncated to seq_len + 1 tokens; untrained targets ignored."""
    ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
    n = len(ids) - 1
    x = np.full(seq_len, pad_id, dtype=np.int64)
    y = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    x[:n] = ids[:-1]
    y[:n] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return x, y


class RowAssigner:
    """Walks global rows in order, giving each to the source with the largest deficit."""

    def __init__(self, shares: np.ndarray) -> None:
        self.shares = shares
        self.next_row, self.counts = 0, np.zeros(len(shares), dtype=np.int64)

    def advance_to(self, row: int) -> None:
        if row < self.next_row:
            self.next_row, self.counts = 0, np.zeros_like(self.counts)
        while self.next_row < row:
            self.take()

    def take(self) -> int:
        source = int(np.argmax(self.shares * (self.next_row + 1) - self.counts))
        self.counts[source] += 1
        self.next_row += 1
        return source


class Mixture:
    """Rows from named sources with the given weights, addressed by global row number."""

    def __init__(self, sources: dict[str, RowSource], weights: dict[str, float], seed: int) -> None:
        self.names = list(sources)
        shares = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.sources, self.seed = sources, seed
        self._drawing, self._counting = RowAssigner(shares / shares.sum()), RowAssigner(shares / shares.sum())

    def rows(self, first: int, count: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        """Global rows first .. first + count - 1, one tensor per part of a row (input and target
        first, seq_len columns each)."""
        self._drawing.advance_to(first)
        rows = [self.sources[self.names[self._drawing.take()]].draw(np.random.default_rng([self.seed, first + i]),
                                                                      seq_len)
                for i in range(count)]
        return tuple(torch.from_numpy(np.stack(part)) for part in zip(*rows))

    def rows_drawn(self, total_rows: int) -> dict[str, int]:
        """Rows per source among the first `total_rows` global rows."""
        self._counting.advance_to(total_rows)
        return {n: int(c) for n, c in zip(self.names, self._counting.counts)}
