"""What a training run reads: its sources and their mixture, the tokenizer, and validation, all
as the run's objective (train/objectives/) defines them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridlm.data.mixture import Mixture
from hybridlm.data.prepare import load_meta
from hybridlm.errors import UserError
from hybridlm.model import HybridLM
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.config import RunConfig
from hybridlm.train.objectives import OBJECTIVES, Objective


@dataclass
class StageData:
    objective: Objective
    mixture: Mixture
    tokenizer: TextTokenizer
    evaluate: Callable[[HybridLM, str], dict]
    lineage: list[dict]  # one record per source: spec, weight, hashes
    state: dict  # the objective's own, for the run (SourceSet.state)


def stage_tokenizer(cfg: RunConfig) -> TextTokenizer:
    """data.tokenizer, else the first prepared source's, else the tokenizer of train.init_from."""
    if cfg.data.tokenizer:
        return TextTokenizer.load(Path(cfg.data.tokenizer))
    if OBJECTIVES[cfg.train.objective].reads_prepared:
        first = Path(next(iter(cfg.data.weights())))
        load_meta(first)  # says "not a prepared data directory" rather than "no tokenizer"
        return TextTokenizer.load(first / "tokenizer.json")
    if cfg.train.init_from:
        return TextTokenizer.load(Path(cfg.train.init_from) / "tokenizer.json")
    raise UserError(f"a {cfg.train.objective} run needs a tokenizer: set data.tokenizer or train.init_from")


def check_sources(cfg: RunConfig) -> None:
    """Fail now if a source is missing or malformed: what a recipe checks for every stage before it
    trains any."""
    objective = OBJECTIVES[cfg.train.objective]
    for spec in cfg.data.weights():
        objective.check_source(spec, cfg)


def build_stage_data(cfg: RunConfig, tokenizer: TextTokenizer) -> StageData:
    objective = OBJECTIVES[cfg.train.objective]
    weights = cfg.data.weights()
    found = objective.sources(cfg, tokenizer)
    mixture = Mixture(found.rows, weights, cfg.train.seed)

    def evaluate(model: HybridLM, dtype: str) -> dict:
        per_source = {name: fn(model, dtype) for name, fn in found.evaluators.items()}
        total = sum(weights.values())
        merged = {k: sum(weights[n] * r[k] for n, r in per_source.items()) / total
                  for k in next(iter(per_source.values())) if k in objective.merged_metrics}
        return {**merged, "by_source": per_source}

    return StageData(objective, mixture, tokenizer, evaluate, found.lineage, found.state)
