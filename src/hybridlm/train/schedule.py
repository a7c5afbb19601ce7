"""Batch shape per optimizer step: fixed, or progressive (sequence-length warmup, batch-size ramp).

Progressive training starts with short sequences and/or few rows and grows them linearly to the
stage's `seq_len` and `batch_size`. Rows are numbered globally over the run, so the data a step
reads depends only on its step number: resume and rank splits stay exact under any schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hybridlm.errors import UserError
from hybridlm.train.config import RunConfig

SEQ_MULTIPLE = 8  # warmup lengths are rounded down to a multiple of this (kernel-friendly shapes)


@dataclass(frozen=True)
class BatchSchedule:
    """Rows (all ranks, per micro-batch) and tokens per row at each step."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1
    world: int = 1
    batch_size_start: int = 0
    batch_ramp_steps: int = 0
    seq_len_start: int = 0
    seq_len_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.world:
            raise UserError(f"data.batch_size ({self.batch_size}) is the global micro-batch and must be divisible "
                            f"by the world size ({self.world}); use a multiple of {self.world}")
        if self.batch_size_start and self.batch_size_start % self.world:
            raise UserError(f"progressive.batch_size_start ({self.batch_size_start}) must be divisible by the world size "
                            f"({self.world})")

    def batch_at(self, step: int) -> int:
        """Global rows per micro-batch at `step`: a multiple of the world size."""
        if not self.batch_size_start or step >= self.batch_ramp_steps:
            return self.batch_size
        grown = self.batch_size_start + (self.batch_size - self.batch_size_start) * step / self.batch_ramp_steps
        return max(self.batch_size_start, int(grown) // self.world * self.world)

    def seq_len_at(self, step: int) -> int:
        if not self.seq_len_start or step >= self.seq_len_warmup_steps:
            return self.seq_len
        grown = self.seq_len_start + (self.seq_len - self.seq_len_start) * step / self.seq_len_warmup_steps
        return max(self.seq_len_start, int(grown) // SEQ_MULTIPLE * SEQ_MULTIPLE)

    @property
    def ramp_steps(self) -> int:
        """Steps before the shape settles at (batch_size, seq_len)."""
        return max(self.batch_ramp_steps if self.batch_size_start else 0,
                   self.seq_len_warmup_steps if self.seq_len_start else 0)

    def rows_before(self, step: int) -> int:
        """Global rows drawn by all steps before `step`."""
        ramp = min(step, self.ramp_steps)
        return int(self._ramp_table[0][ramp]) + (step - ramp) * self.batch_size * self.grad_accum

    def tokens_before(self, step: int) -> int:
        """Training tokens (input positions) of all steps before `step`."""
        ramp = min(step, self.ramp_steps)
        return int(self._ramp_table[1][ramp]) + (step - ramp) * self.batch_size * self.grad_accum * self.seq_len

    def steps_for_tokens(self, tokens: int) -> int:
        """The fewest steps whose tokens reach `tokens` (a stage budget)."""
        ramp_tokens = self.tokens_before(self.ramp_steps)
        if tokens > ramp_tokens:
            per_step = self.batch_size * self.grad_accum * self.seq_len
            return self.ramp_steps + -(-(tokens - ramp_tokens) // per_step)
        return max(1, int(np.searchsorted(self._ramp_table[1], tokens)))

    @cached_property
    def _ramp_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative rows and tokens before each step of the ramp (index 0 .. ramp_steps)."""
        rows = np.array([self.batch_at(s) * self.grad_accum for s in range(self.ramp_steps)], dtype=np.int64)
        lens = np.array([self.seq_len_at(s) for s in range(self.ramp_steps)], dtype=np.int64)
        zero = np.zeros(1, dtype=np.int64)
        return np.concatenate([zero, rows.cumsum()]), np.concatenate([zero, (rows * lens).cumsum()])


def batch_schedule(cfg: RunConfig, world: int = 1) -> BatchSchedule:
    data, grow = cfg.data, cfg.progressive
    return BatchSchedule(data.batch_size, data.seq_len, data.grad_accum, world, grow.batch_size_start,
                         grow.batch_ramp_steps, grow.seq_len_start, grow.seq_len_warmup_steps)
