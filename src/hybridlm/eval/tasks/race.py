"""RACE-high (the official release's test/high/*.txt under --data-dir/race; not in shared/data, so
users supply RACE.tar.gz unpacked) as lm-evaluation-harness's `race` task (version 3.0) scores it.

lm-eval reads one document per article and asks only its last question; the article's earlier
questions come first with their answers filled in, as context: a cloze question ending "  _  ."
becomes the sentence with the answer in place of the blank, any other becomes "Question: ...\\n
Answer: ...\\n". The prompt is "Article: {article}\\n\\n{those}{last question}", the choices are
its four options, and the metric is acc. Shots, if asked, come from the other articles (the task
has no training split in lm-eval's definition).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc

FOLDER = "race/test/high"
LETTERS = "ABCD"
CLOZE_END = "  _  ."


def _answered(question: str, answer: str) -> str:
    if question[-6:] == CLOZE_END:
        return question[:-5] + answer + "\n"
    return f"Question: {question}\nAnswer: {answer}\n"


def article_item(record: dict) -> McItem:
    """One article's document: its last question, the others answered before it."""
    problems = list(zip(record["questions"], record["options"], record["answers"], strict=True))
    if not problems or any(len(options) != 4 or letter not in LETTERS for _, options, letter in problems):
        raise ValueError("every question needs four options and an answer letter A-D")
    text = f"Article: {record['article']}\n\n"
    for question, options, letter in problems[:-1]:
        text += _answered(question, options[LETTERS.index(letter)])
    question, options, letter = problems[-1]
    return McItem(text + question, tuple(options), LETTERS.index(letter))


def _file_order(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def read_race(folder: Path) -> list[McItem]:
    """Every article file of a RACE split folder (JSON: article, questions, options, answers)."""
    items = []
    for path in sorted(folder.glob("*.txt"), key=_file_order):
        try:
            items.append(article_item(json.loads(path.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a RACE article file ({type(exc).__name__}: {exc}); give the official "
                            "release's JSON files (article, questions, options, answers)") from None
    return items


def prepare(options: EvalOptions) -> McTask:
    folder = Path(options.data_dir) / FOLDER
    items = read_race(folder) if folder.is_dir() else []
    if not items:
        raise UserError(f"no RACE article files under {folder}; RACE is not in shared/data: unpack the official "
                        "RACE.tar.gz as race/ under --data-dir (the task reads race/test/high/*.txt)")
    return prepare_mc("race", items, None, options, metric_names=("acc",))
