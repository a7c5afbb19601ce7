"""LogiQA: the reader counts the README's items and answer letters, and lm-evaluation-harness's
own logiqa task definition, pointed at the same items (in its loader's field layout), gives the
acc and acc_norm `hybridlm eval run` gives."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file
from lm_eval_local import lm_eval_cli, ours, write_local_task

from hybridlm.eval.tasks import logiqa


def test_the_reader_counts_the_readme_items():
    items = logiqa.read_logiqa(shared_file(logiqa.TEST))
    assert len(items) == 651 and [sum(i.gold == k for i in items) for k in range(4)] == [132, 159, 179, 181]
    assert len(logiqa.read_logiqa(shared_file("logiqa/Eval.txt"))) == 651
    assert items[0].query.startswith("Passage: In the planning") and items[0].query.endswith("\nAnswer:")
    assert "citizen park. These" in items[0].query  # ". " after periods, as lm-eval's loader writes it


def test_lm_evals_own_logiqa_gives_the_same_metrics(tiny_run, tmp_path):
    raw = shared_file(logiqa.TEST).read_text(encoding="utf-8").strip().split("\n\n")[:30]
    records = []
    for record in raw:  # the fields lm-eval's logiqa loader makes of the release
        lines = record.split("\n")
        records.append({"label": lines[0].strip(), "context": logiqa._normalize(lines[1]),
                        "question": logiqa._normalize(lines[2]),
                        "options": [logiqa._normalize(option[2:]) for option in lines[3:]]})
    data, tasks = tmp_path / "logiqa.jsonl", tmp_path / "tasks"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_local_task(tasks, "logiqa/logiqa.yaml", "logiqa_local", {"train": data, "validation": data, "test": data})
    theirs = lm_eval_cli(tiny_run, tasks, ["logiqa_local"], tmp_path / "out", tmp_path)["logiqa_local"]
    metrics = ours(tiny_run, "logiqa", 30)["logiqa"]["metrics"]
    assert metrics["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
