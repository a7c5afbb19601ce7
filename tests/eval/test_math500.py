"""MATH-500: the reader counts the README's 500 problems; the gold answers, the reply's final
answer and the equivalence check agree with lm-evaluation-harness's minerva_math functions on
every problem and on hand cases; and lm-eval's own `minerva_math500` task, pointed at the same
problems, gives the prompts, replies and scores `hybridlm eval run` gives."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file
from lm_eval_local import lm_eval_cli, write_local_task

from hybridlm.errors import UserError
from hybridlm.eval.scoring import Scorer
from hybridlm.eval.tasks import math500
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.eval.tasks.multiple_choice import read_jsonl

minerva = pytest.importorskip("lm_eval.tasks.minerva_math.utils", reason="lm-eval's [math] needs: the [dev] extra")


def test_gold_answers_match_lm_evals_on_every_problem():
    records = read_jsonl(shared_file(math500.TEST))
    assert len(records) == 500
    for record in records:
        theirs = minerva.normalize_final_answer(minerva.remove_boxed(minerva.last_boxed_only_string(record["solution"])))
        assert math500.gold_answer(record["solution"]) == theirs


@pytest.mark.parametrize("reply", [
    "so x = 3.\nFinal Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
    "Final Answer: The final answer is $100,000$ dollars. I hope it is correct.\n\nProblem:",
    "Final Answer: The final answer is \\boxed{2\\sqrt3}. I hope",
    "Final Answer: The final answer is $(0,1)$",
    "The answer is 5.",
    "Final Answer: The final answer is 10^\\circ cm. I hope it is correct.",
])
def test_reply_answers_match_lm_evals(reply):
    assert math500.reply_answer(reply) == minerva.normalize_final_answer(minerva.get_unnormalized_answer(reply))


@pytest.mark.parametrize(("a", "b", "same"), [
    ("0.5", "\\frac{1}{2}", True), ("\\frac{2}{4}", "\\frac{1}{2}", True), ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("(0,1)", "(0,1)", True), ("3", "4", False), ("[invalidanswer]", "3", False), ("\\frac{1}{", "1", False), ("x^2", "x", False),
])
def test_equivalence_by_hand_and_as_lm_eval(a, b, same):
    assert math500.equivalent(a, b) is same and minerva.is_equiv(a, b) is same


def test_too_many_shots_are_refused():
    with pytest.raises(UserError, match="use --shots 4 or fewer"):
        math500.prepare(EvalOptions(shots=5))


def test_lm_evals_own_minerva_math500_gives_the_same_prompts_replies_and_scores(tiny_run, tmp_path):
    lines = shared_file(math500.TEST).read_text().splitlines(keepends=True)[:4]
    data, tasks, out = tmp_path / "data", tmp_path / "tasks", tmp_path / "out"
    (data / "math" / "MATH-500").mkdir(parents=True)
    (data / math500.TEST).write_text("".join(lines))
    write_local_task(tasks, "minerva_math/minerva_math500.yaml", "math500_local", {"test": data / math500.TEST},
                     "generation_kwargs:\n  until: [\"Problem:\"]\n  do_sample: false\n  temperature: 0\n"
                     "  max_gen_toks: 24\n")
    theirs = lm_eval_cli(tiny_run, tasks, ["math500_local"], out, tmp_path, "--num_fewshot", "2",
                         "--log_samples")["math500_local"]
    samples = sorted((json.loads(line) for line in next(out.rglob("samples_math500_local_*.jsonl")).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    task = math500.prepare(EvalOptions(data_dir=data, shots=2, max_new_tokens=24))
    scorer = Scorer.from_path(tiny_run, batch_size=4, dtype="fp32")
    replies = scorer.generate_until(task.prompts, 24, math500.UNTIL)
    for sample, prompt, reply in zip(samples, task.prompts, replies, strict=True):
        assert sample["arguments"]["gen_args_0"]["arg_0"] == prompt and sample["resps"][0][0] == reply
    ours = task.score(scorer)["metrics"]
    assert ours["exact_match"] == pytest.approx(theirs["exact_match,none"], abs=1e-12)
    assert ours["math_verify"] == pytest.approx(theirs["math_verify,none"], abs=1e-12)
