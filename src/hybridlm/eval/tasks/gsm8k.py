"""GSM8K (gsm8k/test.jsonl, 1,319 problems) as lm-evaluation-harness's `gsm8k` task (version 3.0)
scores it: the prompt "Question: {question}\\nAnswer:", shots from train.jsonl as the question
and its whole worked answer (lm-eval's YAML asks for 5: pass --shots 5 for its setting), greedy
generation until "Question:" (or the end of text), then two answer extractions:

- strict-match: the number after "#### " (the format the shots teach);
- flexible-extract: the last number-like span in the reply;

each compared with the reference's final number by exact match after lm-eval's normalisation
(case ignored; ",", "$", everything up to "#### " and a final "." removed from both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import TARGET_DELIMITER, EvalOptions, data_file, draw_shots, fewshot_prefix, limited
from hybridlm.eval.tasks.metrics import summarise
from hybridlm.eval.tasks.multiple_choice import read_jsonl

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

TEST, TRAIN = "gsm8k/test.jsonl", "gsm8k/train.jsonl"
UNTIL = ["Question:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"


def strict_answer(reply: str) -> str:
    """The first "#### N" number, or "[invalid]" (lm-eval's strict-match filter)."""
    found = STRICT.search(reply)
    return found.group(1).strip() if found else INVALID


def flexible_answer(reply: str) -> str:
    """The last number-like span, or "[invalid]" (lm-eval's flexible-extract filter)."""
    found = FLEXIBLE.findall(reply)
    if not found:
        return INVALID
    return next((group for group in found[-1] if group), INVALID).strip()


def normalise(text: str) -> str:
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def answer_matches(extracted: str, reference: str) -> float:
    return float(normalise(extracted) == normalise(reference))


@dataclass
class Gsm8kTask:
    prompts: list[str]
    references: list[str]
    max_new_tokens: int

    def score(self, scorer: Scorer) -> dict:
        replies = scorer.generate_until(self.prompts, self.max_new_tokens, UNTIL)
        metrics, stderr = summarise({
            "exact_match_strict": [answer_matches(strict_answer(r), ref) for r, ref in zip(replies, self.references)],
            "exact_match_flexible": [answer_matches(flexible_answer(r), ref) for r, ref in zip(replies, self.references)],
        })
        return {"metrics": metrics, "n": len(replies), "stderr": stderr}


def _records(path) -> list[tuple[str, str]]:
    pairs = []
    for i, record in enumerate(read_jsonl(path)):
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
            raise UserError(f"{path}: item {i + 1} needs the strings 'question' and 'answer'")
        pairs.append((f"Question: {record['question']}\nAnswer:", record["answer"]))
    return pairs


def prepare(options: EvalOptions) -> Gsm8kTask:
    items = limited(_records(data_file(options, TEST)), options.limit)
    pool = _records(data_file(options, TRAIN)) if options.shots else []
    shots = draw_shots("gsm8k", len(items), len(pool), options.shots, options.seed, from_items=False)
    prompts = [fewshot_prefix([pool[j][0] + TARGET_DELIMITER + pool[j][1] for j in picks]) + query
               for (query, _), picks in zip(items, shots)]
    return Gsm8kTask(prompts, [answer for _, answer in items], options.max_new_tokens)
