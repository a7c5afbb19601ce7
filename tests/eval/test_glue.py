"""GLUE: the readers count what shared/data's README lists, the MNLI and QQP readers take GLUE's
own format (on small made-up files), the corpus metrics equal scikit-learn's and SciPy's, the
group averages as the GLUE paper does, and lm-evaluation-harness's own mrpc and cola task
definitions, pointed at the same items, give the metrics `hybridlm eval run` gives."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import shared_file
from lm_eval_local import offline_env, ours, write_local_task
from scipy import stats
from sklearn import metrics as sk

from hybridlm.errors import UserError
from hybridlm.eval.tasks import glue, task_names
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.eval.tasks.metrics import f1_binary, f1_macro, matthews, pearson, spearman


@pytest.mark.parametrize(("name", "relative", "count"), [
    ("cola", "glue/CoLA/dev.tsv", 1043), ("cola", "glue/CoLA/train.tsv", 8551), ("mrpc", "glue/MRPC/dev.tsv", 408),
    ("mrpc", "glue/MRPC/train.tsv", 3668), ("qnli", "glue/QNLI/dev.tsv", 5463), ("rte", "glue/RTE/dev.tsv", 277),
    ("rte", "glue/RTE/train.tsv", 2490), ("wnli", "glue/WNLI/dev.tsv", 71),
])
def test_readers_count_the_readme_items(name, relative, count):
    assert len(glue.read_items(name, shared_file(relative))) == count


def test_labels_and_prompts_follow_lm_eval():
    cola = glue.read_items("cola", shared_file("glue/CoLA/dev.tsv"))
    assert sum(i.gold for i in cola) == 721  # the README: 721 acceptable, 322 not
    qnli = glue.read_items("qnli", shared_file("glue/QNLI/dev.tsv"))
    assert sum(i.gold == 0 for i in qnli) == 2702 and qnli[0].choices == ("yes", "no")
    assert qnli[0].query == ("What came into force after the new constitution was herald?\nAs of that day, the new "
                             "constitution heralding the Second Republic came into force.\nQuestion: Does this "
                             "response answer the question?\nAnswer:")
    mrpc = glue.read_items("mrpc", shared_file("glue/MRPC/dev.tsv"))
    assert mrpc[0].query.startswith("Sentence 1: ")  # the BOM is not part of the first column's name
    items, scores = glue.read_stsb(shared_file("glue/STS-B/dev.tsv"))
    assert len(items) == len(scores) == 1500 and all(0 <= s <= 5 for s in scores)
    assert len(glue.read_stsb(shared_file("glue/STS-B/train.tsv"))[0]) == 5749


def test_mnli_and_qqp_readers_take_glues_format(tmp_path):
    """Made-up rows in the official layouts (the real dev sets are not in shared/data)."""
    mnli = tmp_path / "glue" / "MNLI"
    mnli.mkdir(parents=True)
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    rows = [("A cat sat.", "An animal sat", "entailment"), ("It rained.", "It was dry.", "contradiction"),
            ("He left.", "He left at noon.", "neutral")]
    text = header + "".join(f"{i}\tp\tq\tfiction\t(x)\t(y)\t(X)\t(Y)\t{a}\t{b}\t{g}\t{g}\n" for i, (a, b, g) in enumerate(rows))
    (mnli / "dev_matched.tsv").write_text(text)
    items = glue.read_items("mnli", mnli / "dev_matched.tsv")
    assert [i.gold for i in items] == [0, 2, 1]
    assert items[0].query == "A cat sat.\nQuestion: An animal sat. True, False or Neither?\nAnswer:"
    qqp = tmp_path / "glue" / "QQP"
    qqp.mkdir()
    (qqp / "dev.tsv").write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tWhy?\tHow come?\t1\n")
    (item,) = glue.read_items("qqp", qqp / "dev.tsv")
    assert item.gold == 1 and item.choices == ("no", "yes")
    options = EvalOptions(data_dir=tmp_path)
    assert glue.available(options) == ["qqp", "mnli"]
    (mnli / "dev_matched.tsv").write_text(header + "0\tp\tq\tg\tx\ty\tX\tY\ta\tb\tc\tmaybe\n")
    with pytest.raises(UserError, match="label 'maybe' is none of entailment, neutral, contradiction"):
        glue.read_items("mnli", mnli / "dev_matched.tsv")


def test_corpus_metrics_equal_scikit_learn_and_scipy():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        gold, pred = [rng.randint(0, 1) for _ in range(n)], [rng.randint(0, 1) for _ in range(n)]
        pairs = list(zip(gold, pred))
        assert matthews(pairs) == pytest.approx(sk.matthews_corrcoef(gold, pred), abs=1e-12)
        assert f1_binary(pairs) == pytest.approx(sk.f1_score(gold, pred, zero_division=0), abs=1e-12)
        gold3, pred3 = [rng.randint(0, 2) for _ in range(n)], [rng.randint(0, 2) for _ in range(n)]
        labels = sorted(set(gold3))
        assert f1_macro(list(zip(gold3, pred3)), labels) == pytest.approx(
            sk.f1_score(gold3, pred3, labels=labels, average="macro", zero_division=0), abs=1e-12)
        x, y = [rng.choice([0.0, 1.0, 2.5, rng.random()]) for _ in range(n)], [rng.random() for _ in range(n)]
        if len(set(x)) > 1:
            assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
            assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)  # ties averaged


def test_the_group_averages_as_the_glue_paper():
    results = {"cola": {"metrics": {"mcc": 0.2}}, "mrpc": {"metrics": {"acc": 0.6, "f1": 0.8}},
               "stsb": {"metrics": {"pearson": 0.1, "spearman": 0.3}}, "mnli": {"metrics": {"acc": 0.4}},
               "mnli_mismatch": {"metrics": {"acc": 0.5}}, "rte": {"metrics": {"acc": 0.55}}}
    summary = glue.glue_average(results)
    assert summary["tasks"] == {"cola": 0.2, "mrpc": 0.7, "stsb": pytest.approx(0.2), "mnli": 0.45, "rte": 0.55}
    assert summary["metrics"]["score"] == pytest.approx((0.2 + 0.7 + 0.2 + 0.45 + 0.55) / 5)
    assert summary["missing"] == ["sst2", "qqp", "qnli", "wnli"]
    assert "glue" in task_names("glue")
    with pytest.raises(UserError, match="groups: glue"):
        task_names("gleu")


def test_lm_evals_own_mrpc_and_cola_give_the_same_metrics(tiny_run, tmp_path):
    """lm-eval's task YAMLs (prompt, choices, metrics) with only the data source replaced by the
    first 40 dev items in Hugging Face's field names (its train split too: lm-eval opens one even
    at 0 shots); ours read GLUE's TSV for the same items."""
    tasks = tmp_path / "tasks"
    rows = {"mrpc": [{"sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": int(r["Quality"]), "idx": i}
                     for i, r in enumerate(glue.read_tsv(shared_file("glue/MRPC/dev.tsv"))[:40])],
            "cola": [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i}
                     for i, r in enumerate(glue.read_tsv(shared_file("glue/CoLA/dev.tsv"), glue.COLA_COLUMNS)[:40])]}
    for task, records in rows.items():
        data = tmp_path / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        write_local_task(tasks, f"glue/{task}/default.yaml", f"{task}_local", {"validation": data, "train": data})
    # lm-eval's own evaluator in a fresh interpreter; through its Python entry point because its
    # command line cannot turn off the 100,000-resample bootstrap of mcc / f1 (two minutes here).
    code = (f"import json, lm_eval; from lm_eval.tasks import TaskManager; print(json.dumps(lm_eval.simple_evaluate("
            f"model='hybridlm', model_args='path={tiny_run},dtype=fp32', tasks=['mrpc_local', 'cola_local'], "
            f"task_manager=TaskManager(include_path='{tasks}'), bootstrap_iters=0)['results']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(tmp_path),
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    doc = ours(tiny_run, "mrpc,cola", 40)
    assert doc["mrpc"]["metrics"]["acc"] == pytest.approx(theirs["mrpc_local"]["acc,none"], abs=1e-12)
    assert doc["mrpc"]["metrics"]["f1"] == pytest.approx(theirs["mrpc_local"]["f1,none"], abs=1e-12)
    assert doc["cola"]["metrics"]["mcc"] == pytest.approx(theirs["cola_local"]["mcc,none"], abs=1e-12)


def test_eval_report_shows_the_groups(tmp_path):
    from hybridlm.eval.compare import write_eval_report

    tasks = {"cola": {"metrics": {"mcc": 0.1}, "n": 5, "stderr": {}}, "rte": {"metrics": {"acc": 0.5}, "n": 5, "stderr": {}}}
    tasks["glue"] = glue.glue_average(tasks)
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"model": "runs/x", "seed": 1234, "shots": 0, "limit": 5, "tasks": tasks}))
    write_eval_report([results], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| glue | score | 0.3000" in text and "| cola | mcc |" in text
