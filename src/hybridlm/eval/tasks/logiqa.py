"""LogiQA (the official English release: logiqa/Test.txt, 651 items) as lm-evaluation-harness's
`logiqa` task (version 1.0) scores it: "Passage: ...\\nQuestion: ...\\nChoices:\\nA. ...\\n...\\nAnswer:"
with the four options as the choices; acc and acc_norm. The text is normalised as lm-eval's
loader does (". " after every period: the release runs sentences together). Shots come from the
test items themselves (Train.txt is not in shared/data; Eval.txt is the validation split)."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc

TEST = "logiqa/Test.txt"
LETTERS = ("a", "b", "c", "d")


def _normalize(text: str) -> str:
    return text.replace(".", ". ").strip()


def read_logiqa(path: Path) -> list[McItem]:
    """Records of 7 lines (answer letter, context, question, options A-D) between blank lines."""
    items = []
    for number, record in enumerate(path.read_text(encoding="utf-8").strip().split("\n\n"), start=1):
        lines = record.split("\n")
        if len(lines) != 7 or lines[0].strip() not in LETTERS:
            raise UserError(f"{path}: record {number} is not an answer letter, a passage, a question and four options")
        options = [_normalize(option[2:]) for option in lines[3:]]
        prompt = (f"Passage: {_normalize(lines[1])}\nQuestion: {_normalize(lines[2])}\nChoices:\n"
                  + "".join(f"{letter.upper()}. {option}\n" for letter, option in zip(LETTERS, options)) + "Answer:")
        items.append(McItem(prompt, tuple(options), LETTERS.index(lines[0].strip())))
    return items


def prepare(options: EvalOptions) -> McTask:
    return prepare_mc("logiqa", read_logiqa(data_file(options, TEST)), None, options,
                      metric_names=("acc", "acc_norm"))
