"""LogiQA: the reader counts the README's items and answer letters, and lm-evaluation-harness's
own logiqa task definition, pointed at the same items (in its loader's field layout), gives the
acc and acc_norm `hybridlm eval run` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, shared_file

from hybridlm.eval.tasks import logiqa


def test_the_reader_counts_the_readme_items():
    items = logiqa.read_logiqa(shared_file(logiqa.TEST))
    assert len(items) == 651 and [sum(i.gold == k for i in items) for k in range(4)] == [132, 159, 179, 181]
    assert len(logiqa.read_logiqa(shared_file("logiqa/Eval.txt"))) == 651
    assert items[0].query.startswith("Passage: In the planning") and items[0].query.endswith("\nAnswer:")
    assert "citizen park. These" in items[0].query  # ". " after periods, as lm-eval's loader writes it


LOCAL_TASK = """include: {lm_eval}/tasks/logiqa/logiqa.yaml
task: logiqa_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {data}
    validation: {data}
    test: {data}
"""


def test_lm_evals_own_logiqa_gives_the_same_metrics(tiny_run, tmp_path):
    import lm_eval

    raw = shared_file(logiqa.TEST).read_text(encoding="utf-8").strip().split("\n\n")[:30]
    records = []
    for record in raw:  # the fields lm-eval's logiqa loader makes of the release
        lines = record.split("\n")
        records.append({"label": lines[0].strip(), "context": logiqa._normalize(lines[1]),
                        "question": logiqa._normalize(lines[2]),
                        "options": [logiqa._normalize(option[2:]) for option in lines[3:]]})
    data, tasks, out = tmp_path / "logiqa.jsonl", tmp_path / "tasks", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks.mkdir()
    (tasks / "logiqa_local.yaml").write_text(LOCAL_TASK.format(lm_eval=Path(lm_eval.__file__).parent, data=data))
    script = Path(sys.executable).parent / "lm_eval"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([*command, "--model", "hybridlm", "--model_args", f"path={tiny_run},dtype=fp32", "--tasks",
                             "logiqa_local", "--include_path", str(tasks), "--output_path", str(out)],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["logiqa_local"]
    ours = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--tasks", "logiqa",
                           "--limit", "30", "--dtype", "fp32", "--data-dir", str(SHARED_DATA), "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert ours.returncode == 0, ours.stderr[-2000:]
    metrics = json.loads(ours.stdout)["tasks"]["logiqa"]["metrics"]
    assert metrics["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
