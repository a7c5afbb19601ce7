"""lm-eval's own `squadv2` task (its prompt, greedy reply until a newline and " unanswerable"
log-likelihood) on local rows, for the SQuAD parity test; lm-eval loads this file as a task
module. Two things are replaced: the data source (the JSON lines in $HYBRIDLM_SQUAD_ROWS, in
Hugging Face's squad_v2 layout), and the metric, which lm-eval takes from `evaluate.load("squad_v2")`
and so from the network: here it is the official SQuAD 2.0 evaluation script's algorithm
(evaluate-v2.0.py: raw scores, the 1.0 no-answer threshold, find_best_thresh), transcribed."""

from __future__ import annotations

import collections
import os
import re
import string
from functools import partial

import datasets
from lm_eval.tasks.squadv2.task import SQuAD2


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = normalize_answer(a_gold).split(), normalize_answer(a_pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        diff = scores[qid] if qid_to_has_ans[qid] else (-1 if preds[qid] else 0)
        cur_score += diff
        best_score = max(best_score, cur_score)
    return 100.0 * best_score / len(scores)


def official(key: str, items) -> float:
    preds = {p["id"]: p["prediction_text"] for p, _ in items}
    na_probs = {p["id"]: p["no_answer_probability"] for p, _ in items}
    has_ans = {r["id"]: bool(r["answers"]["text"]) for _, r in items}
    exact, f1 = {}, {}
    for _, ref in items:
        golds = [a for a in ref["answers"]["text"] if normalize_answer(a)] or [""]
        exact[ref["id"]] = max(compute_exact(a, preds[ref["id"]]) for a in golds)
        f1[ref["id"]] = max(compute_f1(a, preds[ref["id"]]) for a in golds)
    table = {"exact": exact, "f1": f1}
    if key.startswith(("HasAns_", "NoAns_")):
        kind, metric = key.split("_")
        ids = [q for q, h in has_ans.items() if h == (kind == "HasAns")]
        return 100.0 * sum(table[metric][q] for q in ids) / len(ids) if ids else 0
    if key.startswith("best_"):
        return find_best_thresh(preds, table[key[5:]], na_probs, has_ans)
    return 100.0 * sum(table[key].values()) / len(table[key])


class LocalSQuAD2(SQuAD2):
    def download(self, dataset_kwargs=None, **kwargs) -> None:
        rows = os.environ["HYBRIDLM_SQUAD_ROWS"]
        self.dataset = datasets.load_dataset("json", data_files={"train": rows, "validation": rows})

    def aggregation(self):
        return {key: partial(official, key) for key in super().aggregation()}
