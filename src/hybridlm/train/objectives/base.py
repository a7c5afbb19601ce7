"""What a training objective is: the data it reads, how a batch becomes a loss, how it is
validated, whether attention is causal. The trainer and the stage data ask the objective and
never branch on its name, so a new objective (reward model, DPO, RL) is one new object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hybridlm.model import HybridLM
from hybridlm.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from hybridlm.data.mixture import RowSource
    from hybridlm.train.config import RunConfig

Evaluator = Callable[[HybridLM, str], dict]
"""(model, dtype) -> validation figures of one source: loss, and bpb or accuracy where they exist."""


@dataclass
class SourceSet:
    """An objective's view of a run's sources: rows to draw, how to validate each, their lineage."""

    rows: dict[str, RowSource] = field(default_factory=dict)
    evaluators: dict[str, Evaluator] = field(default_factory=dict)
    lineage: list[dict] = field(default_factory=list)


class Objective:
    """One training objective. Subclasses set the class attributes and implement `sources`."""

    name: str = ""
    causal: bool = True
    """Whether the model attends causally (False: every position sees the whole sequence)."""
    reads_prepared: bool = True
    """Sources are `hybridlm prepare` directories (and carry the tokenizer); else instruction files."""

    def check_source(self, spec: str) -> None:
        """Fail now if `spec` is missing or malformed (a recipe checks every stage before training)."""
        raise NotImplementedError

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        """Rows, evaluators and lineage for every source of cfg.data's mixture."""
        raise NotImplementedError

    def batch(self, x_BT: torch.Tensor, y_BT: torch.Tensor, first_row: int, cfg: RunConfig,
              tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the rows numbered first_row.. as the model sees them; the rows
        the mixture gives are the targets' source (the default passes them through)."""
        return x_BT, y_BT
