"""SuperGLUE as lm-evaluation-harness scores it (lm_eval/tasks/super_glue/*/default.yaml, group
`super-glue-lm-eval-v1`), read from SuperGLUE's own JSONL release (superglue/TASK/val.jsonl).

| task | lm-eval version | prompt | choices | metrics |
|---|---|---|---|---|
| boolq | 2.0 | "{passage}\\nQuestion: {question}?\\nAnswer:" | no, yes | acc |
| cb | 1.0 | "{premise}\\nQuestion: {hypothesis}. True, False, or Neither?\\nAnswer:" | True, False, Neither | acc, f1 (macro over the 3 classes) |
| copa | 1.0 | the premise without its period + " because" / " therefore" | " " + each choice, first letter lowered | acc |
| multirc | 2.0 | "{paragraph}\\nQuestion: {question}\\nAnswer:" | "{answer}\\nIs the answer correct? yes" / "... no" | acc; also em and f1a |
| sglue_rte | 0.0 | "{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:" | True, False | acc |
| wic | 1.0 | "Sentence 1: ..\\nSentence 2: ..\\nQuestion: Is the word '{word in s1}' used in the same way in the two sentences above?\\nAnswer:" | no, yes | acc |
| wsc | 1.0 | "Passage: {text, *pronoun* marked}\\nQuestion: In the passage above, does the pronoun \\"*{p}*\\" refer to \\"*{noun}*\\"?\\nAnswer:" | no, yes | acc |

Labels follow Hugging Face's `super_glue` (which lm-eval reads): CB entailment 0, contradiction 1,
neutral 2; booleans as 0/1. MultiRC's target is lm-eval's as written: the label (1 = the answer is
correct) indexes the choices, so a correct answer's target is the "... no" continuation; `acc` is
that, for parity. `em` (every answer of a question judged right) and `f1a` (F1 over all answers,
"yes" meaning correct) are SuperGLUE's own MultiRC metrics, with the model's choice read the
natural way. lm-eval scores WSC on Hugging Face's `wsc.fixed`; SuperGLUE's own val file is read
here (its few known span errors included). ReCoRD is in record.py (its file must be supplied).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.metrics import argmax, bootstrap_stderr, f1_binary, mean, mean_stderr
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc, read_jsonl

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer


def _bool(value, where: str) -> int:
    if not isinstance(value, bool):
        raise UserError(f"{where}: label should be a JSON boolean (got {value!r})")
    return int(value)


def _named(value, names: dict[str, int], where: str) -> int:
    if value not in names:
        raise UserError(f"{where}: label {value!r} is none of {', '.join(names)}")
    return names[value]


def detokenize(text: str) -> str:
    """lm-eval's general_detokenize: undo the spaces a tokenised text has around punctuation."""
    for before, after in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(before, after)
    return re.sub(r" (['.,])", r"\1", text)


def boolq(r: dict, where: str) -> McItem:
    return McItem(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ("no", "yes"), _bool(r["label"], where))


def cb(r: dict, where: str) -> McItem:
    return McItem(f"{r['premise']}\nQuestion: {r['hypothesis']}. True, False, or Neither?\nAnswer:",
                  ("True", "False", "Neither"), _named(r["label"], {"entailment": 0, "contradiction": 1, "neutral": 2}, where))


def copa(r: dict, where: str) -> McItem:
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    lower = [" " + c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
    return McItem(f"{r['premise'].strip()[:-1]} {connector}", tuple(lower), int(r["label"]))


def rte(r: dict, where: str) -> McItem:
    return McItem(f"{r['premise']}\nQuestion: {r['hypothesis']} True or False?\nAnswer:", ("True", "False"),
                  _named(r["label"], {"entailment": 0, "not_entailment": 1}, where))


def wic(r: dict, where: str) -> McItem:
    word = r["sentence1"][r["start1"] : r["end1"]]
    return McItem(f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nQuestion: Is the word '{word}' used in "
                  "the same way in the two sentences above?\nAnswer:", ("no", "yes"), _bool(r["label"], where))


def wsc(r: dict, where: str) -> McItem:
    target = r["target"]
    pre = " ".join(r["text"].split()[: target["span2_index"]])
    post = r["text"][len(pre) + len(target["span2_text"]) + 1 :]
    passage = detokenize(pre + f" *{target['span2_text']}*" + post)
    return McItem(f"Passage: {passage}\nQuestion: In the passage above, does the pronoun \"*{target['span2_text']}*\" "
                  f"refer to \"*{target['span1_text']}*\"?\nAnswer:", ("no", "yes"), _bool(r["label"], where))


@dataclass(frozen=True)
class Spec:
    folder: str
    item: object
    metrics: tuple[str, ...] = ("acc",)


SPECS: dict[str, Spec] = {
    "boolq": Spec("BoolQ", boolq), "cb": Spec("CB", cb, ("acc", "f1_macro")), "copa": Spec("COPA", copa),
    "sglue_rte": Spec("RTE", rte), "wic": Spec("WiC", wic), "wsc": Spec("WSC", wsc),
}


def read_items(name: str, path: Path) -> list[McItem]:
    spec = SPECS[name]
    try:
        return [spec.item(r, f"{path}: item {i + 1}") for i, r in enumerate(read_jsonl(path))]
    except KeyError as exc:
        raise UserError(f"{path}: a record lacks the field {exc}; is this SuperGLUE's {spec.folder} file?") from None


def prepare(name: str, options: EvalOptions) -> McTask:
    spec = SPECS[name]
    items = read_items(name, data_file(options, f"superglue/{spec.folder}/val.jsonl"))
    train = Path(options.data_dir) / f"superglue/{spec.folder}/train.jsonl"
    pool = read_items(name, train) if options.shots and train.is_file() else None
    return prepare_mc(name, items, pool, options, metric_names=spec.metrics)


# ---- MultiRC ---------------------------------------------------------------------------------

def read_multirc(path: Path) -> tuple[list[McItem], list[str]]:
    """One item per answer (lm-eval's layout), and the question each belongs to (for em)."""
    items, questions = [], []
    for record in read_jsonl(path):
        passage = record["passage"]
        for question in passage["questions"]:
            for answer in question["answers"]:
                choices = (f"{answer['text']}\nIs the answer correct? yes", f"{answer['text']}\nIs the answer correct? no")
                items.append(McItem(f"{passage['text']}\nQuestion: {question['question']}\nAnswer:", choices,
                                    int(answer["label"])))
                questions.append(f"{record['idx']}-{question['idx']}")
    return items, questions


@dataclass
class MultircTask:
    mc: McTask
    questions: list[str]

    def score(self, scorer: Scorer) -> dict:
        lls = self.mc.choice_loglikelihoods(scorer)
        hits = [float(argmax(item_lls) == item.gold) for item, item_lls in zip(self.mc.items, lls)]
        # SuperGLUE's reading: the model says "correct" when it prefers the "... yes" continuation.
        pairs = [(item.gold, int(item_lls[0] >= item_lls[1])) for item, item_lls in zip(self.mc.items, lls)]
        by_question: dict[str, list[bool]] = defaultdict(list)
        for question, (gold, said) in zip(self.questions, pairs):
            by_question[question].append(gold == said)
        exact = [float(all(judged)) for judged in by_question.values()]
        metrics = {"acc": mean(hits), "em": mean(exact), "f1a": f1_binary(pairs)}
        stderr = {"acc": mean_stderr(hits), "em": mean_stderr(exact), "f1a": bootstrap_stderr(f1_binary, pairs)}
        return {"metrics": metrics, "n": len(hits), "stderr": {k: v for k, v in stderr.items() if v is not None}}


def prepare_multirc(options: EvalOptions) -> MultircTask:
    items, questions = read_multirc(data_file(options, "superglue/MultiRC/val.jsonl"))
    train = Path(options.data_dir) / "superglue/MultiRC/train.jsonl"
    pool = read_multirc(train)[0] if options.shots and train.is_file() else None
    mc = prepare_mc("multirc", items, pool, options, metric_names=())
    return MultircTask(mc, questions[: len(mc.items)])


# ---- the group -------------------------------------------------------------------------------

GROUP = ("boolq", "cb", "copa", "multirc", "record", "sglue_rte", "wic", "wsc")
_MAIN = {"cb": ("acc", "f1_macro"), "multirc": ("em", "f1a"), "record": ("f1", "em")}


def superglue_average(results: dict[str, dict]) -> dict:
    """The SuperGLUE score over the tasks scored: each task's metrics averaged (CB: acc and F1,
    MultiRC: EM and F1a, ReCoRD: F1 and EM, as SuperGLUE's leaderboard), then the tasks averaged."""
    scores = {name: mean([results[name]["metrics"][k] for k in _MAIN.get(name, ("acc",))])
              for name in GROUP if name in results}
    return {"metrics": {"score": mean(list(scores.values()))}, "n": len(scores), "stderr": {}, "tasks": scores,
            "missing": [name for name in GROUP if name not in results]}


def available(options: EvalOptions) -> list[str]:
    folders = {name: spec.folder for name, spec in SPECS.items()} | {"multirc": "MultiRC", "record": "ReCoRD"}
    return [name for name in GROUP if (Path(options.data_dir) / f"superglue/{folders[name]}/val.jsonl").is_file()]
