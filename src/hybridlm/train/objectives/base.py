"""What a training objective is: the data it reads, how a batch becomes a loss, how it is
validated, whether attention is causal, which output head the model carries. The trainer and the stage data ask the objective and
never branch on its name, so a new objective (reward model, DPO, RL) is one new object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from hybridlm.data.mixture import RowSource
    from hybridlm.train.config import RunConfig

Rows = tuple[torch.Tensor, ...]
"""A micro-batch as the mixture draws it: one tensor per part of a row, batch first."""
Evaluator = Callable[[HybridLM, str], dict]
"""(model, dtype) -> validation figures of one source: loss, and bpb or accuracy where they exist."""


@dataclass
class SourceSet:
    """An objective's view of a run's sources: rows to draw, how to validate each, their lineage,
    and what the objective keeps for the run (a reward model, samples reused over steps)."""

    rows: dict[str, RowSource] = field(default_factory=dict)
    evaluators: dict[str, Evaluator] = field(default_factory=dict)
    lineage: list[dict] = field(default_factory=list)
    state: dict = field(default_factory=dict)


@dataclass
class StepContext:
    """What an objective sees when it turns drawn rows into a batch and a batch into a loss."""

    cfg: RunConfig
    tokenizer: TextTokenizer
    model: HybridLM
    """The unwrapped model (generation in the loop); the loss goes through the wrapped one."""
    state: dict
    """The run's SourceSet.state; figures given to `record` go into the step's training record."""
    step: int = 0


def record(state: dict, **figures: float) -> None:
    """Add one micro-batch's figures to the step's training record: the record keeps their mean,
    or their sum for names ending in _s or _tokens (times and counts)."""
    for name, value in figures.items():
        state.setdefault("metrics", {}).setdefault(name, []).append(value)


def step_figures(state: dict) -> dict:
    """The figures recorded during the step just taken, reduced; none are kept for the next."""
    parts = state.pop("metrics", {})
    return {k: sum(v) if k.endswith(("_s", "_tokens")) else sum(v) / len(v) for k, v in parts.items()}


class Objective:
    """One training objective. Subclasses set the class attributes and implement `sources`."""

    name: str = ""
    causal: bool = True
    """Whether the model attends causally (False: every position sees the whole sequence)."""
    reads_prepared: bool = True
    """Sources are `hybridlm prepare` directories (and carry the tokenizer); else instruction files."""
    head: str = "lm"
    """The model.head this objective trains (rm: "reward"); a parent with another head loads
    without the head it lacks, which starts fresh."""
    merged_metrics: tuple[str, ...] = ("loss", "bpb", "accuracy")
    """Validation figures averaged over sources by their weights (every figure stays in by_source)."""

    def check_source(self, spec: str, cfg: RunConfig) -> None:
        """Fail now if `spec` is missing or malformed (a recipe checks every stage before training)."""
        raise NotImplementedError

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        """Rows, evaluators and lineage for every source of cfg.data's mixture."""
        raise NotImplementedError

    def batch(self, rows: Rows, first_row: int, ctx: StepContext) -> Rows:
        """The rows numbered first_row.. as the model sees them (the default passes them through;
        rows[0] is the input ids, rows[1] the targets, IGNORE_INDEX where nothing is scored)."""
        return rows

    def units(self, rows: Rows) -> int:
        """What the loss is a mean over (scored tokens; preference pairs), so micro-batches and
        ranks weigh their losses by their share of the step."""
        return int((rows[1] != IGNORE_INDEX).sum())

    def loss(self, model: Callable, rows: Rows, ctx: StepContext) -> torch.Tensor:
        """The mean loss of a micro-batch, through `model` (the wrapped model: DDP and FSDP must see
        every forward)."""
        return model(rows[0], targets_BT=rows[1], causal=self.causal)
