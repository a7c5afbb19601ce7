"""SQuAD 1.1 and 2.0 from the official dev files (squad/dev-v1.1.json, squad/dev-v2.0.json under
--data-dir; they are not in shared/data, so users supply them), scored as lm-evaluation-harness's
`squadv2` (version 3) does and with the official evaluation script's metrics.

The prompt is "Title: {title}\\n\\nBackground: {context}\\n\\nQuestion: {question}\\n\\nAnswer:"; the
model continues greedily until a newline. Answers are compared after the official normalisation
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed): `exact` and
`f1` take the best over the gold answers, in percent as the official script reports them. For
2.0, an unanswerable question's gold is the empty answer, and, as lm-eval does, the
log-likelihood of " unanswerable" gives each question's no-answer probability: `exact` / `f1`
use the script's default threshold 1.0 (the reply is taken as it is), `best_exact` / `best_f1`
the best threshold, and `HasAns_*` / `NoAns_*` split the two kinds of question.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file, limited

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

FILES = {"squadv2": "squad/dev-v2.0.json", "squad": "squad/dev-v1.1.json"}


def normalize_answer(text: str) -> str:
    """The official script's normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1; an empty answer scores 1 against an empty one and 0 against any other."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    answers: tuple[str, ...]
    """Empty for an unanswerable (2.0) question."""


def read_squad(path: Path) -> list[Question]:
    """The official JSON: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text"}], "is_impossible"?}]}]}]}."""
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        questions = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = () if qa.get("is_impossible") else tuple(a["text"] for a in qa["answers"])
                    prompt = (f"Title: {article['title']}\n\nBackground: {paragraph['context']}\n\n"
                              f"Question: {qa['question']}\n\nAnswer:")
                    questions.append(Question(qa["id"], prompt, answers))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a SQuAD JSON file ({type(exc).__name__}: {exc}); give the official "
                        "dev-v1.1.json / dev-v2.0.json") from None
    return questions


def _best_over_golds(metric, prediction: str, answers: tuple[str, ...]) -> float:
    """The best score over the gold answers (those that normalise to nothing dropped, as the
    official script does; none left: the empty answer)."""
    golds = [a for a in answers if normalize_answer(a)] or [""]
    return max(metric(prediction, gold) for gold in golds)


def _best_threshold(scores: list[float], na_probs: list[float], has_answer: list[bool], replied: list[bool]) -> float:
    """The official find_best_thresh: the best total when the questions whose no-answer
    probability is above a threshold are answered with the empty string. Raising the threshold
    past a question adds its score if it has an answer, else costs 1 if the model replied."""
    current = best = sum(not h for h in has_answer)  # everything abstained: the NoAns ones are right
    for index in sorted(range(len(scores)), key=lambda i: na_probs[i]):
        current += scores[index] if has_answer[index] else -float(replied[index])
        best = max(best, current)
    return 100.0 * best / len(scores)


@dataclass
class SquadTask:
    questions: list[Question]
    version: int
    max_new_tokens: int

    def score(self, scorer: Scorer) -> dict:
        replies = scorer.generate_until([q.prompt for q in self.questions], self.max_new_tokens, ["\n"])
        ex = [_best_over_golds(exact, r, q.answers) for r, q in zip(replies, self.questions)]
        fs = [_best_over_golds(f1, r, q.answers) for r, q in zip(replies, self.questions)]
        metrics = {"exact": 100.0 * sum(ex) / len(ex), "f1": 100.0 * sum(fs) / len(fs)}
        if self.version == 2:
            lls = scorer.loglikelihood([(q.prompt, " unanswerable") for q in self.questions])
            na_probs = [math.exp(ll) for ll, _ in lls]
            has = [bool(q.answers) for q in self.questions]
            for name, keep in (("HasAns", True), ("NoAns", False)):
                chosen = [i for i, h in enumerate(has) if h == keep]
                if chosen:
                    metrics[f"{name}_exact"] = 100.0 * sum(ex[i] for i in chosen) / len(chosen)
                    metrics[f"{name}_f1"] = 100.0 * sum(fs[i] for i in chosen) / len(chosen)
            replied = [bool(r) for r in replies]
            metrics["best_exact"] = _best_threshold(ex, na_probs, has, replied)
            metrics["best_f1"] = _best_threshold(fs, na_probs, has, replied)
        return {"metrics": metrics, "n": len(replies), "stderr": {}}


def prepare(name: str, options: EvalOptions) -> SquadTask:
    if options.shots:
        raise UserError(f"{name} is scored zero-shot, as lm-eval's squadv2 is; leave out --shots")
    questions = limited(read_squad(data_file(options, FILES[name])), options.limit)
    return SquadTask(questions, 2 if name == "squadv2" else 1, options.max_new_tokens)
