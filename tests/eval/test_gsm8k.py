"""GSM8K: the reader counts the README's problems, the answer extraction and normalisation by
hand, and lm-evaluation-harness's own gsm8k task definition on the same problems (2 shots, a
short generation) produces the same prompts, the same greedy replies, the same extracted answers
and the same exact-match scores as ours; likewise its gsm8k_cot (the fixed chain-of-thought
exemplars) on 3 shots."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file
from lm_eval_local import lm_eval_cli, write_local_task

from hybridlm.errors import UserError
from hybridlm.eval.scoring import Scorer
from hybridlm.eval.tasks import gsm8k
from hybridlm.eval.tasks.base import EvalOptions


def test_the_readers_count_the_readme_problems():
    assert len(gsm8k._records(shared_file(gsm8k.TEST))) == 1319
    assert len(gsm8k._records(shared_file(gsm8k.TRAIN))) == 7473


@pytest.mark.parametrize(("reply", "strict", "flexible"), [
    ("She pays 3 * 2 = 6 dollars.\n#### 6", "6", "6"),
    ("The answer is $1,234.", "[invalid]", "$1,234."),
    ("No digits here", "[invalid]", "[invalid]"),
    ("#### -7.5 and then 12", "-7.5", "12"),
])
def test_answer_extraction_as_lm_evals_filters(reply, strict, flexible):
    assert gsm8k.strict_answer(reply) == strict and gsm8k.flexible_answer(reply) == flexible


def test_normalisation_as_lm_evals_exact_match():
    reference = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 1,800"
    assert gsm8k.answer_matches("$1,800.", reference) == 1.0 and gsm8k.answer_matches("1800", reference) == 1.0
    assert gsm8k.answer_matches("180", reference) == 0.0 and gsm8k.answer_matches("[invalid]", reference) == 0.0


GENERATION = """generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 24
"""


def test_lm_evals_own_gsm8k_gives_the_same_replies_answers_and_scores(tiny_run, tmp_path):
    test, train, tasks, out = tmp_path / "test.jsonl", tmp_path / "train.jsonl", tmp_path / "tasks", tmp_path / "out"
    test.write_text("".join(shared_file(gsm8k.TEST).read_text().splitlines(keepends=True)[:6]))
    train.write_text("".join(shared_file(gsm8k.TRAIN).read_text().splitlines(keepends=True)[:50]))
    write_local_task(tasks, "gsm8k/gsm8k.yaml", "gsm8k_local", {"train": train, "test": test}, GENERATION)
    theirs = lm_eval_cli(tiny_run, tasks, ["gsm8k_local"], out, tmp_path, "--num_fewshot", "2",
                         "--log_samples")["gsm8k_local"]
    samples = {}
    for line in next(out.rglob("samples_gsm8k_local_*.jsonl")).read_text().splitlines():
        sample = json.loads(line)
        samples.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    for name in ("test", "train"):
        (data / "gsm8k" / f"{name}.jsonl").write_text((tmp_path / f"{name}.jsonl").read_text())
    task = gsm8k.prepare(EvalOptions(data_dir=data, shots=2, max_new_tokens=24))
    scorer = Scorer.from_path(tiny_run, batch_size=4, dtype="fp32")
    replies = scorer.generate_until(task.prompts, 24, gsm8k.UNTIL)
    for i, (prompt, reply) in enumerate(zip(task.prompts, replies)):
        strict, flexible = samples[i]["strict-match"], samples[i]["flexible-extract"]
        assert strict["arguments"]["gen_args_0"]["arg_0"] == prompt  # the same shots, drawn with the same seed
        assert strict["resps"][0][0] == reply
        assert strict["filtered_resps"][0] == gsm8k.strict_answer(reply)
        assert flexible["filtered_resps"][0] == gsm8k.flexible_answer(reply)
    ours = task.score(scorer)["metrics"]
    assert ours["exact_match_strict"] == pytest.approx(theirs["exact_match,strict-match"], abs=1e-12)
    assert ours["exact_match_flexible"] == pytest.approx(theirs["exact_match,flexible-extract"], abs=1e-12)


def test_lm_evals_own_gsm8k_cot_gives_the_same_prompts_and_scores(tiny_run, tmp_path):
    test, tasks, out = tmp_path / "test.jsonl", tmp_path / "tasks", tmp_path / "out"
    test.write_text("".join(shared_file(gsm8k.TEST).read_text().splitlines(keepends=True)[:5]))
    write_local_task(tasks, "gsm8k/gsm8k-cot.yaml", "gsm8k_cot_local", {"test": test},
                     GENERATION.replace('"Question:"', '"Q:"'))
    theirs = lm_eval_cli(tiny_run, tasks, ["gsm8k_cot_local"], out, tmp_path, "--num_fewshot", "3",
                         "--log_samples")["gsm8k_cot_local"]
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / gsm8k.TEST).write_text(test.read_text())
    task = gsm8k.prepare_cot(EvalOptions(data_dir=data, shots=3, max_new_tokens=24))
    prompts = {json.loads(line)["doc_id"]: json.loads(line)["arguments"]["gen_args_0"]["arg_0"]
               for line in next(out.rglob("samples_gsm8k_cot_local_*.jsonl")).read_text().splitlines()}
    assert [prompts[i] for i in range(5)] == task.prompts
    assert task.prompts[0].startswith("Q: There are 15 trees") and task.prompts[0].endswith("\nA:")
    ours = task.score(Scorer.from_path(tiny_run, batch_size=4, dtype="fp32"))["metrics"]
    assert ours["exact_match_strict"] == pytest.approx(theirs["exact_match,strict-match"], abs=1e-12)
    assert ours["exact_match_flexible"] == pytest.approx(theirs["exact_match,flexible-extract"], abs=1e-12)


def test_cot_extraction_and_shot_limit():
    assert gsm8k.strict_answer("so 3 + 4 = 7. The answer is 7.", gsm8k.COT_STRICT) == "7"
    assert gsm8k.strict_answer("#### 7", gsm8k.COT_STRICT) == gsm8k.INVALID
    with pytest.raises(UserError, match="use --shots 8 or fewer"):
        gsm8k.prepare_cot(EvalOptions(shots=9))
