"""GLUE SST-2 (dev, 872 sentences) as lm-eval's prompted sst2 task: "{sentence}\\nQuestion: Is this
sentence positive or negative?\\nAnswer:" with the continuations " negative" (label 0) and
" positive" (label 1); the metric is acc only, as in lm-eval. Shots come from train.tsv."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc

DEV, TRAIN = "glue/SST-2/dev.tsv", "glue/SST-2/train.tsv"
CHOICES = ("negative", "positive")


def read_sst2(path: Path) -> list[McItem]:
    """Rows of `sentence<TAB>label` after the header (GLUE's TSV has no quoting)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:2] != ["sentence", "label"]:
        raise UserError(f"{path} does not start with the GLUE header 'sentence<TAB>label'")
    items = []
    for number, line in enumerate(lines[1:], start=2):
        sentence, _, label = line.rpartition("\t")
        if label.strip() not in ("0", "1"):
            raise UserError(f"{path}: line {number} should end with a tab and the label 0 or 1")
        items.append(McItem(f"{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:", CHOICES,
                            int(label)))
    return items


def prepare(options: EvalOptions) -> McTask:
    items = read_sst2(data_file(options, DEV))
    pool = read_sst2(data_file(options, TRAIN)) if options.shots else []
    return prepare_mc("sst2", items, pool, options, metric_names=("acc",))
