"""Causal language modelling: next-token prediction on windows of prepared token shards,
validated by loss and bits per byte on each source's validation split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.data.mixture import WindowSource
from hybridlm.data.prepare import load_meta
from hybridlm.errors import UserError
from hybridlm.fileio import sha256_file
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.objectives.base import Evaluator, Objective, SourceSet
from hybridlm.train.validation import evaluate_split

if TYPE_CHECKING:
    from hybridlm.train.config import RunConfig


def prepared_sources(cfg: RunConfig, tokenizer: TextTokenizer, evaluator) -> SourceSet:
    """Training windows of every prepared source, each validated by `evaluator(data_dir, cfg,
    tokenizer)`; all sources must share the run's tokenizer."""
    found = SourceSet()
    for spec, weight in cfg.data.weights().items():
        meta = load_meta(Path(spec))
        if meta["tokenizer_sha256"] != tokenizer.sha256():
            raise UserError(f"{spec} was prepared with another tokenizer than this run's; prepare every source "
                            "with the same tokenizer.json")
        found.rows[spec] = WindowSource(Path(spec), "train", cfg.data.seq_len)
        found.evaluators[spec] = evaluator(Path(spec), cfg, tokenizer)
        found.lineage.append({"spec": spec, "weight": weight, "meta_sha256": sha256_file(Path(spec) / "meta.json"),
                              "sources": meta["sources"]})
    return found


def split_evaluator(data_dir: Path, cfg: RunConfig, tokenizer: TextTokenizer) -> Evaluator:
    return lambda model, dtype: evaluate_split(model, data_dir, cfg.data.seq_len, cfg.eval.tokens, dtype)


class CausalLM(Objective):
    name = "clm"

    def check_source(self, spec: str, cfg: RunConfig) -> None:
        load_meta(Path(spec))

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        return prepared_sources(cfg, tokenizer, split_evaluator)
