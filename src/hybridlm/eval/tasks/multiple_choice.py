"""Log-likelihood multiple choice (lm-eval's `output_type: multiple_choice`), and the generic
JSONL task `mc:PATH` so a new set needs no code.

Each choice is scored as the continuation " " + choice of the (few-shot) prompt; acc, acc_norm
(per character, as lm-eval) and acc_bytes (per UTF-8 byte) are defined in metrics.py. Generic
records are `{"context": str, "choices": [str, ...], "label": int}` (label = index of the right
choice), one per line; the prompt is the context as it is, so `mc:PATH` scores exactly what an
lm-eval YAML with `doc_to_text: context`, `doc_to_choice: choices`, `doc_to_target: label` scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import (
    TARGET_DELIMITER,
    EvalOptions,
    draw_shots,
    fewshot_prefix,
    limited,
)
from hybridlm.eval.tasks.metrics import (
    argmax,
    bootstrap_stderr,
    choice_hits,
    f1_binary,
    f1_macro,
    matthews,
    summarise,
)
from hybridlm.fileio import jsonl_records

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

PREFIX = "mc:"


@dataclass(frozen=True)
class McItem:
    query: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or not 0 <= self.gold < len(self.choices):
            raise ValueError(f"bad multiple-choice item: {len(self.choices)} choices, gold {self.gold}")

    def shot(self) -> str:
        """The item as a labelled few-shot example."""
        return f"{self.query}{TARGET_DELIMITER}{self.choices[self.gold]}"


CORPUS_METRICS: dict[str, Callable[[list[tuple[int, int]], int], float]] = {
    "mcc": lambda pairs, classes: matthews(pairs), "f1": lambda pairs, classes: f1_binary(pairs),
    "f1_macro": lambda pairs, classes: f1_macro(pairs, range(classes)),
}
"""Metrics of a whole task's (gold, argmax of the log-likelihoods) pairs and its number of
choices (f1_macro averages every class, as lm-eval's CB f1 does), with a bootstrap stderr."""


@dataclass
class McTask:
    items: list[McItem]
    contexts: list[str]
    metric_names: tuple[str, ...]
    """Per-item metrics (acc, acc_norm, acc_bytes) and corpus ones (CORPUS_METRICS)."""

    def choice_loglikelihoods(self, scorer: Scorer) -> list[list[float]]:
        requests = [(ctx, TARGET_DELIMITER + choice) for ctx, item in zip(self.contexts, self.items)
                    for choice in item.choices]
        results = iter(scorer.loglikelihood(requests))
        return [[next(results)[0] for _ in item.choices] for item in self.items]

    def score(self, scorer: Scorer) -> dict:
        lls = self.choice_loglikelihoods(scorer)
        per_item: dict[str, list[float]] = {name: [] for name in self.metric_names if name not in CORPUS_METRICS}
        for item, item_lls in zip(self.items, lls):
            hits = choice_hits(item_lls, item.choices, item.gold)
            for name in per_item:
                per_item[name].append(hits[name])
        metrics, stderr = summarise(per_item) if per_item else ({}, {})
        pairs = [(item.gold, argmax(item_lls)) for item, item_lls in zip(self.items, lls)]
        classes = len(self.items[0].choices) if self.items else 0
        for name in self.metric_names:
            if name in CORPUS_METRICS:
                metric = partial(CORPUS_METRICS[name], classes=classes)
                metrics[name] = metric(pairs)
                if (err := bootstrap_stderr(metric, pairs)) is not None:
                    stderr[name] = err
        return {"metrics": metrics, "n": len(self.items), "stderr": stderr}


def prepare_mc(name: str, items: list[McItem], pool: list[McItem] | None, options: EvalOptions,
               metric_names: tuple[str, ...] = ("acc", "acc_norm", "acc_bytes")) -> McTask:
    """Limit the items and build their prompts; shots come from `pool` (a training split) or, when
    it is None, from the other items."""
    shots_pool = items if pool is None else pool
    chosen = limited(items, options.limit)
    shots = draw_shots(name, len(chosen), len(shots_pool), options.shots, options.seed, from_items=pool is None)
    contexts = [fewshot_prefix([shots_pool[j].shot() for j in picks]) + item.query
                for item, picks in zip(chosen, shots)]
    return McTask(chosen, contexts, metric_names)


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per non-empty line; a bad line is a UserError naming file and line."""
    records = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def generic_item(record: dict, where: str) -> McItem:
    context, choices, label = record.get("context"), record.get("choices"), record.get("label")
    if not isinstance(context, str) or not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: needs a string 'context' and a list of strings 'choices'")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices) or len(choices) < 2:
        raise UserError(f"{where}: 'label' must be the index of the right choice among at least two "
                        f"(got {label!r} with {len(choices)} choices)")
    return McItem(context, tuple(choices), label)


def prepare_generic(spec: str, options: EvalOptions) -> McTask:
    """`mc:PATH`: a JSONL file of {"context", "choices", "label"}; shots from its other items."""
    path = Path(spec[len(PREFIX) :]).expanduser()
    if not path.is_file():
        raise UserError(f"multiple-choice file not found: {path} (task {spec}: give mc:PATH to a JSONL file "
                        f"of {{\"context\", \"choices\", \"label\"}} records)")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path} holds no items")
    items = [generic_item(r, f"{path}: item {i + 1}") for i, r in enumerate(records)]
    return prepare_mc(spec, items, None, options)
