"""GSM8K (gsm8k/test.jsonl, 1,319 problems) as lm-evaluation-harness's `gsm8k` task (version 3.0)
scores it: the prompt "Question: {question}\\nAnswer:", shots from train.jsonl as the question
and its whole worked answer (lm-eval's YAML asks for 5: pass --shots 5 for its setting), greedy
generation until "Question:" (or the end of text), then two answer extractions:

- strict-match: the number after "#### " (the format the shots teach);
- flexible-extract: the last number-like span in the reply;

each compared with the reference's final number by exact match after lm-eval's normalisation
(case ignored; ",", "$", everything up to "#### " and a final "." removed from both).

`gsm8k_cot` is lm-eval's `gsm8k_cot` (version 3.0): "Q: {question}\nA:", the first --shots of
the eight fixed chain-of-thought exemplars of Wei et al. (2022) (its YAML asks for 8), generation
until "Q:", strict-match on "The answer is N." and the same flexible extraction; the reference
is the number after "####".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
COT_UNTIL = ["Q:", "</s>", "<|im_end|>"]
COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
COT_SHOTS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were "
     "added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had "
     "35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. "
     "23 - 15 is 8. The answer is 8."),
)
"""The chain-of-thought exemplars of Wei et al. (2022), as lm-eval's gsm8k_cot gives them."""
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"


def strict_answer(reply: str, pattern: re.Pattern = STRICT) -> str:
    """The first "#### N" (gsm8k_cot: "The answer is N.") number, or "[invalid]" (lm-eval's strict-match filter)."""
    found = pattern.search(reply)
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
    until: list[str] = field(default_factory=lambda: list(UNTIL))
    strict: re.Pattern = STRICT

    def score(self, scorer: Scorer) -> dict:
        replies = scorer.generate_until(self.prompts, self.max_new_tokens, self.until)
        metrics, stderr = summarise({
            "exact_match_strict": [answer_matches(strict_answer(r, self.strict), ref)
                                   for r, ref in zip(replies, self.references)],
            "exact_match_flexible": [answer_matches(flexible_answer(r), ref) for r, ref in zip(replies, self.references)],
        })
        return {"metrics": metrics, "n": len(replies), "stderr": stderr}


def _records(path) -> list[tuple[str, str]]:
    """(question, worked answer ending "#### N") per line."""
    pairs = []
    for i, record in enumerate(read_jsonl(path)):
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
            raise UserError(f"{path}: item {i + 1} needs the strings 'question' and 'answer'")
        pairs.append((record["question"], record["answer"]))
    return pairs


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def prepare(options: EvalOptions) -> Gsm8kTask:
    items = limited(_records(data_file(options, TEST)), options.limit)
    pool = _records(data_file(options, TRAIN)) if options.shots else []
    shots = draw_shots("gsm8k", len(items), len(pool), options.shots, options.seed, from_items=False)
    prompts = [fewshot_prefix([_prompt(pool[j][0]) + TARGET_DELIMITER + pool[j][1] for j in picks]) + _prompt(question)
               for (question, _), picks in zip(items, shots)]
    return Gsm8kTask(prompts, [answer for _, answer in items], options.max_new_tokens)


def prepare_cot(options: EvalOptions) -> Gsm8kTask:
    if options.shots > len(COT_SHOTS):
        raise UserError(f"--shots {options.shots} is more than the {len(COT_SHOTS)} fixed exemplars gsm8k_cot draws "
                        f"from; use --shots {len(COT_SHOTS)} or fewer")
    items = limited(_records(data_file(options, TEST)), options.limit)
    prefix = fewshot_prefix([f"Q: {q}\nA:{TARGET_DELIMITER}{a}" for q, a in COT_SHOTS[: options.shots]])
    prompts = [f"{prefix}Q: {question}\nA:" for question, _ in items]
    return Gsm8kTask(prompts, [answer for _, answer in items], options.max_new_tokens, COT_UNTIL, COT_STRICT)
