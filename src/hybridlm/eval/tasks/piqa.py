"""PIQA (validation, 1,838 items): valid.jsonl (goal, sol1, sol2) with the line-aligned
valid-labels.lst. Prompt as lm-eval's piqa: "Question: {goal}\\nAnswer:", choices sol1/sol2. The
training split is not in shared/data, so shots come from the other validation items."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc, read_jsonl

ITEMS, LABELS = "mc/piqa/valid.jsonl", "mc/piqa/valid-labels.lst"


def read_piqa(items_path: Path, labels_path: Path) -> list[McItem]:
    records = read_jsonl(items_path)
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise UserError(f"{items_path} has {len(records)} items but {labels_path} has {len(labels)} labels")
    try:
        return [McItem(f"Question: {r['goal']}\nAnswer:", (r["sol1"], r["sol2"]), int(label))
                for r, label in zip(records, labels)]
    except (KeyError, ValueError) as exc:
        raise UserError(f"{items_path}: items need goal/sol1/sol2 and labels 0 or 1 ({exc})") from None


def prepare(options: EvalOptions) -> McTask:
    return prepare_mc("piqa", read_piqa(data_file(options, ITEMS), data_file(options, LABELS)), None, options)
