"""SuperGLUE: the readers count what shared/data's README lists, MultiRC's EM and F1a by hand,
the group average, and lm-evaluation-harness's own cb (macro-F1 aggregation) and copa (its odd
choice format) task definitions, pointed at the same items, give the metrics `eval run` gives."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file
from lm_eval_local import lm_eval_cli, ours, write_local_task

from hybridlm.eval.tasks import superglue
from hybridlm.eval.tasks.metrics import f1_binary


@pytest.mark.parametrize(("name", "folder", "val", "train"), [
    ("boolq", "BoolQ", 3270, None), ("cb", "CB", 56, 250), ("copa", "COPA", 100, 400), ("sglue_rte", "RTE", 277, 2490),
    ("wic", "WiC", 638, 5428), ("wsc", "WSC", 104, 554),
])
def test_readers_count_the_readme_items(name, folder, val, train):
    assert len(superglue.read_items(name, shared_file(f"superglue/{folder}/val.jsonl"))) == val
    if train:
        assert len(superglue.read_items(name, shared_file(f"superglue/{folder}/train.jsonl"))) == train


def test_multirc_reader_and_prompts():
    items, questions = superglue.read_multirc(shared_file("superglue/MultiRC/val.jsonl"))
    assert len(items) == 4848 and len(set(questions)) == 953  # answers and questions, as the README counts
    assert items[0].choices[0].endswith("\nIs the answer correct? yes") and items[0].query.endswith("\nAnswer:")
    (copa,) = superglue.read_items("copa", shared_file("superglue/COPA/val.jsonl"))[:1]
    assert copa.query == "The man turned on the faucet therefore" and copa.choices[1] == " water flowed from the spout."
    wsc = superglue.read_items("wsc", shared_file("superglue/WSC/val.jsonl"))[0]
    assert wsc.query.startswith("Passage: ") and '"*him*"' in wsc.query and "refer to \"*anyone*\"" in wsc.query


def test_multirc_em_and_f1a_by_hand():
    class FakeScorer:  # per answer: (ll of "... yes", ll of "... no"): yes, no, yes | yes, yes
        def loglikelihood(self, requests):
            lls = [-1, -2, -3, -1, -1, -2, -1, -3, -1, -4]
            return [(ll, False) for ll in lls]

    mc = superglue.McTask([superglue.McItem("q", ("a yes", "a no"), gold) for gold in (1, 0, 0, 1, 1)], ["c"] * 5, ())
    result = superglue.MultircTask(mc, ["q1", "q1", "q1", "q2", "q2"]).score(FakeScorer())
    # said correct: yes, no, yes, yes, yes; gold correct: 1, 0, 0, 1, 1 -> q1 has one wrong, q2 all right
    assert result["metrics"]["em"] == 0.5
    assert result["metrics"]["f1a"] == pytest.approx(f1_binary([(1, 1), (0, 0), (0, 1), (1, 1), (1, 1)])) == 6 / 7
    assert result["metrics"]["acc"] == pytest.approx(1 / 5)  # lm-eval's target: label 1 -> "... no"


def test_the_group_average():
    results = {"cb": {"metrics": {"acc": 0.5, "f1_macro": 0.3}}, "multirc": {"metrics": {"acc": 0.2, "em": 0.1, "f1a": 0.5}},
               "copa": {"metrics": {"acc": 0.6}}}
    summary = superglue.superglue_average(results)
    assert summary["tasks"] == {"cb": 0.4, "multirc": 0.3, "copa": 0.6}
    assert summary["metrics"]["score"] == pytest.approx(1.3 / 3) and "boolq" in summary["missing"]


def test_lm_evals_own_cb_and_copa_give_the_same_metrics(tiny_run, tmp_path):
    """lm-eval's YAMLs (prompts, choices, CB's cb_multi_fi aggregation) with only the data source
    replaced by the first 40 validation items in Hugging Face's field names (its train split too:
    lm-eval opens one even at 0 shots)."""
    tasks = tmp_path / "tasks"
    cb_labels = {"entailment": 0, "contradiction": 1, "neutral": 2}
    rows = {"cb": [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": cb_labels[r["label"]], "idx": r["idx"]}
                   for r in map(json.loads, shared_file("superglue/CB/val.jsonl").read_text().splitlines()[:40])],
            "copa": [{k: r[k] for k in ("premise", "choice1", "choice2", "question", "label", "idx")}
                     for r in map(json.loads, shared_file("superglue/COPA/val.jsonl").read_text().splitlines()[:40])]}
    for task, records in rows.items():
        data = tmp_path / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        write_local_task(tasks, f"super_glue/{task}/default.yaml", f"{task}_local", {"validation": data, "train": data})
    theirs = lm_eval_cli(tiny_run, tasks, ["cb_local", "copa_local"], tmp_path / "out", tmp_path)
    doc = ours(tiny_run, "cb,copa", 40)
    assert doc["cb"]["metrics"]["acc"] == pytest.approx(theirs["cb_local"]["acc,none"], abs=1e-12)
    assert doc["cb"]["metrics"]["f1_macro"] == pytest.approx(theirs["cb_local"]["f1,none"], abs=1e-12)
    assert doc["copa"]["metrics"]["acc"] == pytest.approx(theirs["copa_local"]["acc,none"], abs=1e-12)
