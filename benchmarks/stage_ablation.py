"""Claim 6: the three-stage recipe against the same token budget without stage 2 (focused
pre-training) and without stage 3 (instruction tuning), each measured on the stages' own held-out
evaluations.

The quickstart's `small` recipe (300 steps of 16 x 256 tokens: broad 80%, focused 15%, instruct 5%)
on its own prepared data (a finished `hybridlm quickstart --out DIR`, whose run is the "full" arm).
A removed stage's steps go to the stage before it, so every arm trains 300 steps:
- no focused: broad 95%, instruct 5%;
- no instruct: broad 80%, focused 20%.
Each arm's final model is scored on: bits per byte of the whole docstrings and language-reference
validation splits (stages 1 and 2), and, on the held-out `stdlib-docs:qa` conversations (stage 3),
the reply loss and `eval run gen:stdlib-docs:qa` (greedy replies: ROUGE-L, BLEU, exact match).

Usage: .venv/bin/python benchmarks/stage_ablation.py --quickstart runs/quickstart --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridlm.data.instructions import BUILTIN_QA, held_out_split, read_conversations
from hybridlm.data.mixture import padded_row
from hybridlm.device import default_device, resolve_dtype
from hybridlm.eval.tasks import run_tasks
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.quickstart import quickstart_recipe
from hybridlm.run import load_run
from hybridlm.tokenizer.chat import render_chat
from hybridlm.train.recipe import plan_stages, run_recipe
from hybridlm.train.validation import evaluate_split, padded_rows_loss

SEQ_LEN = 256


def _arm(quickstart: Path, out: Path, drop: str) -> Path:
    """Train the recipe without stage `drop` (its steps to the stage before); the final run dir
    (a finished arm is kept: rerunning only scores again)."""
    doc = quickstart_recipe("small", quickstart)
    stages = doc["stage"]
    index = next(i for i, s in enumerate(stages) if s["name"] == drop)
    stages[index - 1] = {**stages[index - 1], "fraction": stages[index - 1]["fraction"] + stages[index]["fraction"]}
    doc = {**doc, "recipe": {**doc["recipe"], "out": str(out / f"no-{drop}")},
           "stage": [s for i, s in enumerate(stages) if i != index]}
    return Path(run_recipe(plan_stages(doc), progress=True)[-1]["run_dir"])


def _scores(run_dir: Path, quickstart: Path) -> dict:
    run, dtype = load_run(run_dir), resolve_dtype("auto", default_device())
    found = {f"{part}_bpb": evaluate_split(run.model, quickstart / "data" / part, SEQ_LEN, 1 << 62, dtype)["bpb"]
             for part in ("docstrings", "reference")}
    held, _ = held_out_split([render_chat(run.tokenizer, c) for c in read_conversations(BUILTIN_QA)])
    rows = [padded_row(ids, trained, SEQ_LEN, run.tokenizer.special_ids["pad"]) for ids, trained in held]
    found["qa_reply_loss"] = padded_rows_loss(run.model, rows, dtype)["loss"]
    task = run_tasks(run_dir, ["gen:stdlib-docs:qa"], EvalOptions())["tasks"]["gen:stdlib-docs:qa"]
    found.update({f"qa_{k}": v for k, v in task["metrics"].items()})
    found.update({f"qa_{k}_stderr": v for k, v in task["stderr"].items()})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="A finished `hybridlm quickstart` directory.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    arms = {"full": args.quickstart / "run" / "3-instruct",
            "no focused": _arm(args.quickstart, args.out, "focused"),
            "no instruct": _arm(args.quickstart, args.out, "instruct")}
    result = {name: _scores(run_dir, args.quickstart) for name, run_dir in arms.items()}
    (args.out / "stage_ablation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
