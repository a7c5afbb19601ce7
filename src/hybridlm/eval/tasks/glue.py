"""GLUE as lm-evaluation-harness scores it (lm_eval/tasks/glue/*/default.yaml): each task a
log-likelihood multiple choice over its prompt, read from GLUE's original TSV files.

| task | lm-eval version | prompt (doc_to_text) | choices | metrics |
|---|---|---|---|---|
| cola | 1.0 | "{sentence}\\nQuestion: Does this sentence make sense?\\nAnswer:" | no, yes | mcc |
| mrpc | 1.0 | "Sentence 1: {s1}\\nSentence 2: {s2}\\nQuestion: Do both sentences mean the same thing?\\nAnswer:" | no, yes | acc, f1 |
| qnli | 1.0 | "{question}\\n{sentence}\\nQuestion: Does this response answer the question?\\nAnswer:" | yes, no | acc |
| rte | 1.0 | "{s1}\\nQuestion: {s2} True or False?\\nAnswer:" | True, False | acc |
| wnli | 2.0 | the same as rte | False, True | acc |
| qqp | 2.0 | "Question 1: {q1}\\nQuestion 2: {q2}\\nQuestion: Do both questions ask the same thing?\\nAnswer:" | no, yes | acc, f1 |
| mnli, mnli_mismatch | 1.0 | "{premise}\\nQuestion: {hypothesis, ending in .} True, False or Neither?\\nAnswer:" | True, Neither, False | acc |

sst2 is in sst2.py. STS-B has no lm-eval task; ours (`stsb`) asks "...Question: On a scale of 0 to
5, how similar are the two sentences?\\nAnswer:" with the choices 0..5 and predicts the expected
score under the choices' normalised probabilities, reporting Pearson and Spearman correlations
with the gold scores. Shots come from train.tsv where the data has one, else from the task's own
items. MNLI and QQP dev sets are not in shared/data: their readers take GLUE's files
(MNLI/dev_matched.tsv, dev_mismatched.tsv, QQP/dev.tsv) from --data-dir.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.metrics import bootstrap_stderr, mean, pearson, spearman
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

COLA_COLUMNS = ("source", "label", "mark", "sentence")  # CoLA's TSV has no header


def read_tsv(path: Path, columns: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """Rows of a GLUE TSV as dicts (its header, or `columns` for a file without one). GLUE's files
    are not CSV-quoted (a row may hold a lone '"'), and MRPC's header starts with a BOM."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = (list(columns), rows) if columns else (rows[0] if rows else [], rows[1:])
    records = []
    for number, row in enumerate(body, start=1 if columns else 2):
        if len(row) != len(header):
            raise UserError(f"{path}: line {number} has {len(row)} fields where the header has {len(header)}")
        records.append(dict(zip(header, row)))
    return records


def _label(value: str, mapping: dict[str, int], path: Path) -> int:
    if value not in mapping:
        raise UserError(f"{path}: label {value!r} is none of {', '.join(mapping)}")
    return mapping[value]


ENTAILMENT = {"entailment": 0, "not_entailment": 1}
BINARY = {"0": 0, "1": 1}


@dataclass(frozen=True)
class GlueSpec:
    dev: str
    train: str | None
    columns: tuple[str, ...] | None
    item: Callable[[dict[str, str], Path], McItem]
    metrics: tuple[str, ...] = ("acc",)


def _cola(r: dict, path: Path) -> McItem:
    return McItem(f"{r['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:", ("no", "yes"),
                  _label(r["label"], BINARY, path))


def _mrpc(r: dict, path: Path) -> McItem:
    return McItem(f"Sentence 1: {r['#1 String']}\nSentence 2: {r['#2 String']}\nQuestion: Do both sentences mean the "
                  "same thing?\nAnswer:", ("no", "yes"), _label(r["Quality"], BINARY, path))


def _qnli(r: dict, path: Path) -> McItem:
    return McItem(f"{r['question']}\n{r['sentence']}\nQuestion: Does this response answer the question?\nAnswer:",
                  ("yes", "no"), _label(r["label"], ENTAILMENT, path))


def _rte(r: dict, path: Path) -> McItem:
    return McItem(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", ("True", "False"),
                  _label(r["label"], ENTAILMENT, path))


def _wnli(r: dict, path: Path) -> McItem:
    return McItem(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", ("False", "True"),
                  _label(r["label"], BINARY, path))


def _qqp(r: dict, path: Path) -> McItem:
    return McItem(f"Question 1: {r['question1']}\nQuestion 2: {r['question2']}\nQuestion: Do both questions ask the "
                  "same thing?\nAnswer:", ("no", "yes"), _label(r["is_duplicate"], BINARY, path))


def _mnli(r: dict, path: Path) -> McItem:
    hypothesis = r["sentence2"].strip()
    hypothesis += "" if hypothesis.endswith(".") else "."
    return McItem(f"{r['sentence1']}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:",
                  ("True", "Neither", "False"),
                  _label(r["gold_label"], {"entailment": 0, "neutral": 1, "contradiction": 2}, path))


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec("glue/CoLA/dev.tsv", "glue/CoLA/train.tsv", COLA_COLUMNS, _cola, ("mcc",)),
    "mrpc": GlueSpec("glue/MRPC/dev.tsv", "glue/MRPC/train.tsv", None, _mrpc, ("acc", "f1")),
    "qnli": GlueSpec("glue/QNLI/dev.tsv", None, None, _qnli),
    "rte": GlueSpec("glue/RTE/dev.tsv", "glue/RTE/train.tsv", None, _rte),
    "wnli": GlueSpec("glue/WNLI/dev.tsv", None, None, _wnli),
    "qqp": GlueSpec("glue/QQP/dev.tsv", "glue/QQP/train.tsv", None, _qqp, ("acc", "f1")),
    "mnli": GlueSpec("glue/MNLI/dev_matched.tsv", "glue/MNLI/train.tsv", None, _mnli),
    "mnli_mismatch": GlueSpec("glue/MNLI/dev_mismatched.tsv", "glue/MNLI/train.tsv", None, _mnli),
}


def read_items(name: str, path: Path) -> list[McItem]:
    spec = SPECS[name]
    return [spec.item(row, path) for row in read_tsv(path, spec.columns)]


def prepare(name: str, options: EvalOptions) -> McTask:
    spec = SPECS[name]
    items = read_items(name, data_file(options, spec.dev))
    train = Path(options.data_dir) / spec.train if spec.train else None
    pool = read_items(name, train) if options.shots and train is not None and train.is_file() else None
    return prepare_mc(name, items, pool, options, metric_names=spec.metrics)


# ---- STS-B -----------------------------------------------------------------------------------

STSB_DEV, STSB_TRAIN = "glue/STS-B/dev.tsv", "glue/STS-B/train.tsv"
SCALE = tuple(str(i) for i in range(6))


@dataclass
class StsbTask:
    """Similarity scores 0-5 as the expected value of the choices 0..5 (see the module docstring)."""

    mc: McTask
    scores: list[float]

    def score(self, scorer: Scorer) -> dict:
        predicted = []
        for lls in self.mc.choice_loglikelihoods(scorer):
            top = max(lls)
            weights = [math.exp(ll - top) for ll in lls]
            predicted.append(sum(i * w for i, w in enumerate(weights)) / sum(weights))
        pairs = list(zip(predicted, self.scores))
        metrics = {"pearson": pearson(predicted, self.scores), "spearman": spearman(predicted, self.scores)}
        stderr = {name: err for name, fn in (("pearson", pearson), ("spearman", spearman))
                  if (err := bootstrap_stderr(lambda ps, f=fn: f([p for p, _ in ps], [g for _, g in ps]), pairs))
                  is not None}
        return {"metrics": metrics, "n": len(predicted), "stderr": stderr}


def read_stsb(path: Path) -> tuple[list[McItem], list[float]]:
    items, scores = [], []
    for number, row in enumerate(read_tsv(path), start=2):
        try:
            score = float(row["score"])
        except (KeyError, ValueError):
            raise UserError(f"{path}: line {number} has no numeric 'score' column") from None
        items.append(McItem(f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\nQuestion: On a scale "
                            "of 0 to 5, how similar are the two sentences?\nAnswer:", SCALE,
                            min(5, max(0, round(score)))))
        scores.append(score)
    return items, scores


def prepare_stsb(options: EvalOptions) -> StsbTask:
    items, scores = read_stsb(data_file(options, STSB_DEV))
    pool = read_stsb(data_file(options, STSB_TRAIN))[0] if options.shots else None
    mc = prepare_mc("stsb", items, pool, options, metric_names=())
    return StsbTask(mc, scores[: len(mc.items)])


# ---- the group -------------------------------------------------------------------------------

GROUP = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_mismatch", "qnli", "rte", "wnli")


def task_score(name: str, metrics: dict[str, float]) -> float:
    """One number per task as the GLUE paper averages them: the mean of a task's two metrics
    (MRPC and QQP: acc and F1; STS-B: Pearson and Spearman), CoLA's MCC, else accuracy."""
    keys = {"mrpc": ("acc", "f1"), "qqp": ("acc", "f1"), "stsb": ("pearson", "spearman"), "cola": ("mcc",)}
    return mean([metrics[k] for k in keys.get(name, ("acc",))])


def glue_average(results: dict[str, dict]) -> dict:
    """The GLUE score over the tasks scored (MNLI matched and mismatched count as one task)."""
    scores = {name: task_score(name, results[name]["metrics"]) for name in GROUP if name in results}
    if "mnli" in scores and "mnli_mismatch" in scores:
        scores["mnli"] = mean([scores.pop("mnli"), scores.pop("mnli_mismatch")])
    return {"metrics": {"score": mean(list(scores.values()))}, "n": len(scores), "stderr": {},
            "tasks": scores, "missing": [name for name in GROUP if name not in results]}


def available(options: EvalOptions) -> list[str]:
    """The group's tasks whose dev files are in the data directory (MNLI and QQP often are not)."""
    from hybridlm.eval.tasks import sst2

    dev = {name: spec.dev for name, spec in SPECS.items()} | {"sst2": sst2.DEV, "stsb": STSB_DEV}
    return [name for name in GROUP if (Path(options.data_dir) / dev[name]).is_file()]
