"""ARC-Easy and ARC-Challenge (ARC-V1-Feb2018 jsonl): the Test split is scored, shots come from
Train. Prompt as lm-eval's arc_easy / arc_challenge: "Question: {stem}\\nAnswer:", the choices'
texts as continuations, gold = the position of answerKey among the choice labels (letters or
digits; 3 to 5 choices)."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc, read_jsonl

SETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


def split_file(task: str, split: str) -> str:
    name = SETS[task]
    return f"mc/arc/{name}/{name}-{split}.jsonl"


def read_arc(path: Path) -> list[McItem]:
    items = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            question = record["question"]
            labels = [c["label"] for c in question["choices"]]
            texts = tuple(c["text"] for c in question["choices"])
            items.append(McItem(f"Question: {question['stem']}\nAnswer:", texts, labels.index(record["answerKey"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: item {number} is not an ARC question with its answerKey among the "
                            f"choice labels ({exc!r})") from None
    return items


def prepare(task: str, options: EvalOptions) -> McTask:
    items = read_arc(data_file(options, split_file(task, "Test")))
    pool = read_arc(data_file(options, split_file(task, "Train"))) if options.shots else []
    return prepare_mc(task, items, pool, options)
