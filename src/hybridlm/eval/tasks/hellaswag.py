"""HellaSwag (validation, 10,042 items) from the six-line text file in shared/data.

Each item is six lines: `activity_label: ctx`, the gold label, and the four endings. The prompt
and endings go through lm-eval's hellaswag `preprocess` (strip, " [title]" -> ". ", bracketed
markers removed, double spaces collapsed). The derived file keeps `ctx` as one string, so the
first letter of ctx_b is not capitalised as lm-eval's `ctx_a + " " + ctx_b.capitalize()` does:
scores can differ slightly from lm-eval's hellaswag on the original jsonl. There is no training
split here, so shots come from the other validation items.
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc

FILE = "mc/hellaswag/hellaswag_val_full.txt.bz2"
LINES_PER_ITEM = 6


def preprocess(text: str) -> str:
    """lm-eval's hellaswag text clean-up (WikiHow artefacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[McItem]:
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) % LINES_PER_ITEM:
        raise UserError(f"{path} has {len(lines)} lines, not a multiple of {LINES_PER_ITEM}; "
                        "is it the six-line HellaSwag text file?")
    items = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        query, label, *endings = lines[start : start + LINES_PER_ITEM]
        if not label.strip().isdigit():
            raise UserError(f"{path}: line {start + 2} should be the gold label 0-3, got {label!r}")
        items.append(McItem(preprocess(query), tuple(preprocess(e) for e in endings), int(label)))
    return items


def prepare(options: EvalOptions) -> McTask:
    return prepare_mc("hellaswag", read_hellaswag(data_file(options, FILE)), None, options)
