"""SQuAD 1.1 / 2.0: the official normalisation, EM and F1 by hand, the no-answer threshold
search of the official script by hand, the reader on small files in the official format (made up
here: the real dev sets are not in shared/data and must be supplied), the task end to end on
the tiny run, its metrics recomputed from the model's own replies, and lm-eval's own squadv2 on
the same questions giving the same eight metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval_local import lm_eval_cli

from hybridlm.errors import UserError
from hybridlm.eval.scoring import Scorer
from hybridlm.eval.tasks import squad
from hybridlm.eval.tasks.base import EvalOptions

MADE_UP = {"version": "v2.0", "data": [{"title": "Paragraphs", "paragraphs": [
    {"context": "Paragraph 3: the value of x3 is 8.", "qas": [
        {"id": "q1", "question": "What is the value of x3?", "answers": [{"text": "8", "answer_start": 31}],
         "is_impossible": False},
        {"id": "q2", "question": "What is the value of x9?", "answers": [], "is_impossible": True}]},
    {"context": "Paragraph 5: the value of x5 is 9.", "qas": [
        {"id": "q3", "question": "Which paragraph is this?", "answers": [{"text": "Paragraph 5"}, {"text": "5"}]}]}]}]}


def test_official_normalisation_exact_and_f1():
    assert squad.normalize_answer("The  Cat, sat!") == "cat sat"
    assert squad.exact("the cat", "Cat.") == 1.0 and squad.exact("cat sat", "cat") == 0.0
    assert squad.f1("the cat sat down", "a cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert squad.f1("", "") == 1.0 and squad.f1("cat", "") == 0.0 and squad.f1("dog", "cat") == 0.0


def test_the_best_threshold_as_the_official_script():
    # q1 has an answer (score 1, na 0.2), q2 none and the model replied (na 0.9), q3 answer (0.5, na 0.1)
    scores, na, has, replied = [1.0, 0.0, 0.5], [0.2, 0.9, 0.1], [True, False, True], [True, True, True]
    # thresholds in na order: q3 (+0.5) -> 1.5, q1 (+1) -> 2.5, q2 (-1) -> 1.5; start 1 (all abstain)
    assert squad._best_threshold(scores, na, has, replied) == pytest.approx(100 * 2.5 / 3)


def test_the_reader_takes_the_official_format(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(MADE_UP))
    questions = squad.read_squad(path)
    assert [q.id for q in questions] == ["q1", "q2", "q3"] and questions[1].answers == ()
    assert questions[0].prompt == ("Title: Paragraphs\n\nBackground: Paragraph 3: the value of x3 is 8.\n\n"
                                   "Question: What is the value of x3?\n\nAnswer:")
    path.write_text('{"data": [{"title": "x"}]}')
    with pytest.raises(UserError, match="is not a SQuAD JSON file"):
        squad.read_squad(path)


def test_squadv2_end_to_end_metrics_follow_the_replies(tiny_run, tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v2.0.json").write_text(json.dumps(MADE_UP))
    task = squad.prepare("squadv2", EvalOptions(data_dir=tmp_path, max_new_tokens=8))
    scorer = Scorer.from_path(tiny_run, batch_size=4, dtype="fp32")
    result = task.score(scorer)["metrics"]
    replies = scorer.generate_until([q.prompt for q in task.questions], 8, ["\n"])
    assert all("\n" not in r for r in replies)
    expected_f1 = [squad._best_over_golds(squad.f1, r, q.answers) for r, q in zip(replies, task.questions)]
    assert result["f1"] == pytest.approx(100 * sum(expected_f1) / 3)
    assert result["NoAns_exact"] == 100.0 * (squad.normalize_answer(replies[1]) == "")
    na = [math.exp(ll) for ll, _ in scorer.loglikelihood([(q.prompt, " unanswerable") for q in task.questions])]
    has, replied = [bool(q.answers) for q in task.questions], [bool(r) for r in replies]
    assert result["best_f1"] == pytest.approx(squad._best_threshold(expected_f1, na, has, replied))
    assert all(0 < p < 1 for p in na)
    assert set(result) == {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1"}


def test_missing_files_and_shots_are_refused_in_one_line(tiny_run, tmp_path):
    for args, words in ((["--tasks", "squad"], "squad/dev-v1.1.json"), (["--tasks", "squadv2", "--shots", "2"],
                                                                          "zero-shot")):
        (tmp_path / "squad").mkdir(exist_ok=True)
        (tmp_path / "squad" / "dev-v2.0.json").write_text(json.dumps(MADE_UP))
        result = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--data-dir",
                                 str(tmp_path), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_lm_evals_own_squadv2_gives_the_same_metrics(tiny_run, tmp_path, monkeypatch):
    """lm-eval's SQuAD2 task class on the same questions in Hugging Face's squad_v2 rows; its
    metric comes from the official script's algorithm (lm_eval_squad_local.py says why)."""
    paragraphs = [p for article in MADE_UP["data"] for p in article["paragraphs"]]
    more = [{"context": f"Paragraph {k}: the value of x{k} is {k + 3}.", "qas": [
        {"id": f"m{k}", "question": f"What is the value of x{k}?", "answers": [] if k % 3 == 0 else [{"text": str(k + 3)}],
         "is_impossible": k % 3 == 0}]} for k in range(6, 12)]
    document = {"version": "v2.0", "data": [{"title": "Paragraphs", "paragraphs": paragraphs + more}]}
    rows = [{"id": qa["id"], "title": "Paragraphs", "context": p["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [0] * len(qa["answers"])}}
            for p in document["data"][0]["paragraphs"] for qa in p["qas"]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(Path(__file__).with_name("lm_eval_squad_local.py"), tasks)
    (tasks / "squad_local.yaml").write_text("task: squad_local\nclass: !function lm_eval_squad_local.LocalSQuAD2\n")
    monkeypatch.setenv("HYBRIDLM_SQUAD_ROWS", str(tmp_path / "rows.jsonl"))
    theirs = lm_eval_cli(tiny_run, tasks, ["squad_local"], tmp_path / "out", tmp_path, "--gen_kwargs",
                         "max_gen_toks=8")["squad_local"]
    (tmp_path / "data" / "squad").mkdir(parents=True)
    (tmp_path / "data" / "squad" / "dev-v2.0.json").write_text(json.dumps(document))
    result = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--tasks",
                             "squadv2", "--max-new-tokens", "8", "--dtype", "fp32", "--data-dir", str(tmp_path / "data"),
                             "--json"], capture_output=True, text=True, timeout=600, check=True, env=os.environ)
    ours = json.loads(result.stdout)["tasks"]["squadv2"]
    assert ours["n"] == len(rows) == 9
    for metric, value in ours["metrics"].items():
        assert value == pytest.approx(theirs[f"{metric},none"], abs=1e-9), metric
