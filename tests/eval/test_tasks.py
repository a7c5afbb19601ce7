"""Benchmark tasks: each reader on its shared file (counts from shared/data/README.md), each metric
on a hand-checked example, few-shot prompts, and `hybridlm eval run` end to end on a trained run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, shared_file
from conftest import one_line_error as _bad

from hybridlm.data.instructions import HELD_OUT_PERIOD
from hybridlm.errors import UserError
from hybridlm.eval.tasks import (
    arc,
    generation,
    hellaswag,
    lambada,
    piqa,
    sst2,
    task_names,
    wikitext,
)
from hybridlm.eval.tasks.base import EvalOptions, draw_shots, fewshot_prefix
from hybridlm.eval.tasks.metrics import (
    bleu,
    bootstrap_stderr,
    choice_hits,
    exact_match,
    mean_stderr,
    perplexity,
    rouge_l,
)
from hybridlm.eval.tasks.multiple_choice import McItem, prepare_mc


def hybridlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridlm", *args], capture_output=True, text=True, timeout=600,
                          check=False)


# --- readers: item counts equal the README's ------------------------------------------------------------


def test_hellaswag_reader_reads_all_validation_items():
    items = hellaswag.read_hellaswag(shared_file(hellaswag.FILE))
    assert len(items) == 10_042
    first = items[0]
    assert first.query == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.gold == 3 and len(first.choices) == 4
    assert first.choices[3] == "starts pulling up roofing on a roof."
    assert all(len(i.choices) == 4 and 0 <= i.gold < 4 for i in items)


def test_hellaswag_preprocess_matches_lm_eval():
    assert hellaswag.preprocess(" How to cook [title] Heat the pan. [step] Stir ") == "How to cook. Heat the pan. Stir"


def test_piqa_reader_aligns_items_and_labels():
    items = piqa.read_piqa(shared_file(piqa.ITEMS), shared_file(piqa.LABELS))
    assert len(items) == 1_838
    assert items[0].query.startswith("Question: How do I ready a guinea pig cage for it's new occupants?")
    assert items[0].query.endswith("\nAnswer:") and len(items[0].choices) == 2
    assert {i.gold for i in items} == {0, 1}


@pytest.mark.parametrize("task, counts", [("arc_easy", {"Test": 2_376, "Train": 2_251, "Dev": 570}),
                                          ("arc_challenge", {"Test": 1_172, "Train": 1_119, "Dev": 299})])
def test_arc_readers_handle_letters_digits_and_3_to_5_choices(task, counts):
    for split, count in counts.items():
        assert len(arc.read_arc(shared_file(arc.split_file(task, split)))) == count
    items = arc.read_arc(shared_file(arc.split_file(task, "Test")))
    assert {len(i.choices) for i in items} <= {3, 4, 5} and all(i.query.startswith("Question: ") for i in items)


def test_arc_numeric_labels_map_to_positions(tmp_path):
    path = tmp_path / "arc.jsonl"
    question = {"stem": "2 + 2?", "choices": [{"text": t, "label": str(n)} for n, t in enumerate(["3", "4", "5"], 1)]}
    path.write_text(json.dumps({"id": "x", "question": question, "answerKey": "2"}) + "\n")
    [item] = arc.read_arc(path)
    assert item == McItem("Question: 2 + 2?\nAnswer:", ("3", "4", "5"), 1)


def test_lambada_reader_splits_off_the_last_word():
    passages = lambada.read_lambada(shared_file(lambada.FILE))
    assert len(passages) == 5_153
    context, target = passages[0]
    assert context.startswith("in my palm is a clear stone") and context.endswith("i do n't care about")
    assert target == " signs"
    assert len(lambada.read_lambada(shared_file(lambada.DEV_FILE))) == 4_869


def test_sst2_reader_and_prompt():
    items = sst2.read_sst2(shared_file(sst2.DEV))
    assert len(items) == 872
    assert items[0].query == ("it 's a charming and often affecting journey . \n"
                              "Question: Is this sentence positive or negative?\nAnswer:")
    assert items[0].choices == ("negative", "positive") and items[0].gold == 1
    assert len(sst2.read_sst2(shared_file(sst2.TRAIN))) == 67_349


def test_alpaca_gen_holds_out_the_training_rule_examples():
    options = EvalOptions(data_dir=shared_file(generation.ALPACA_FILE).parents[2])
    task = generation.prepare_alpaca(options)
    assert len(task.references) == 2_017 // HELD_OUT_PERIOD == 100
    records = json.loads(shared_file(generation.ALPACA_FILE).read_text())
    assert task.references[0] == records[HELD_OUT_PERIOD - 1]["output"]
    assert task.prompts[0][-1].role == "user" and task.prompts[0][-1].content.startswith(
        records[HELD_OUT_PERIOD - 1]["instruction"])


def test_alpaca_gen_shots_are_earlier_turns_from_training_examples():
    options = EvalOptions(data_dir=shared_file(generation.ALPACA_FILE).parents[2], shots=2, limit=3)
    task = generation.prepare_alpaca(options)
    assert len(task.prompts) == 3 and all(len(p) == 5 for p in task.prompts)
    assert [m.role for m in task.prompts[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert task.prompts[0][1].content not in task.references


def test_wikitext2_reads_the_test_split_and_limits_lines():
    path = shared_file(wikitext.FILE)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4_358
    task = wikitext.prepare(EvalOptions(data_dir=SHARED_DATA, limit=3))
    assert task.text == "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:3])


# --- metrics on hand-checked examples -------------------------------------------------------------------


def test_acc_acc_norm_and_acc_bytes_on_made_up_loglikelihoods():
    # acc picks -10 (choice 0); per character: -10/1 = -10 < -12/13, so acc_norm picks choice 1
    assert choice_hits([-10.0, -12.0], ["a", "longer answer"], gold=1) == {"acc": 0.0, "acc_norm": 1.0,
                                                                         "acc_bytes": 1.0}
    assert choice_hits([-3.0, -1.0, -2.0], ["xx", "yyyy", "z"], gold=1) == {"acc": 1.0, "acc_norm": 1.0,
                                                                          "acc_bytes": 1.0}
    assert choice_hits([-2.0, -2.0], ["b", "b"], gold=0)["acc"] == 1.0  # the first index wins ties
    # "ééé" is 3 characters but 6 bytes: per char -1.8/3 = -0.6 < -1.0/2, per byte -1.8/6 = -0.3 > -0.5
    assert choice_hits([-1.8, -1.0], ["ééé", "ab"], gold=0) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}


def test_mc_task_scores_and_stderr_with_a_fake_scorer():
    items = [McItem("q1", ("a", "bb"), 0), McItem("q2", ("a", "bb"), 1), McItem("q3", ("a", "bb"), 0),
             McItem("q4", ("a", "bb"), 0)]
    lls = {"q1": (-1.0, -3.0), "q2": (-2.0, -3.0), "q3": (-1.0, -5.0), "q4": (-1.0, -1.5)}

    class FakeScorer:
        def loglikelihood(self, requests):
            assert all(cont.startswith(" ") for _, cont in requests)
            return [(lls[ctx][["a", "bb"].index(cont[1:])], False) for ctx, cont in requests]

    result = prepare_mc("fake", items, None, EvalOptions()).score(FakeScorer())
    # acc hits [1, 0, 1, 1]; acc_norm (per char, = per byte here) [1, 1, 1, 0]: q2 -3/2 > -2, q4 -1.5/2 > -1
    assert result["metrics"] == {"acc": 0.75, "acc_norm": 0.75, "acc_bytes": 0.75} and result["n"] == 4
    assert result["stderr"]["acc"] == pytest.approx(0.25)  # sqrt(0.75 / 3) / sqrt(4)


def test_bleu_rouge_l_and_exact_match_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # precisions 5/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 6/5)
    assert bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(-0.2) * (1 * 0.75 * (2 / 3) * 0.5) ** 0.25, abs=1e-6)
    # LCS 5 tokens: precision 5/5, recall 5/6 -> F = 10/11
    assert rouge_l(["the cat sat on mat"], ["the cat sat on the mat"]) == [pytest.approx(10 / 11)]
    assert exact_match([" a \n", "b"], ["a", "c"]) == [1.0, 0.0]


def test_perplexity_and_standard_errors():
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.e**2)
    assert mean_stderr([1.0]) is None and mean_stderr([0.0, 1.0]) == pytest.approx(0.5)
    first = bootstrap_stderr(perplexity, [-1.0, -2.0, -4.0, -0.5])
    assert first == bootstrap_stderr(perplexity, [-1.0, -2.0, -4.0, -0.5]) and first > 0  # seeded


# --- few-shot -------------------------------------------------------------------------------------------


def test_shots_exclude_the_item_and_are_seeded():
    drawn = draw_shots("t", 5, 5, 2, seed=1, from_items=True)
    assert all(len(picks) == 2 and i not in picks for i, picks in enumerate(drawn))
    assert drawn == draw_shots("t", 5, 5, 2, seed=1, from_items=True) != draw_shots("t", 5, 5, 2, seed=2,
                                                                                     from_items=True)
    assert fewshot_prefix(["q1 a", "q2 b"]) == "q1 a\n\nq2 b\n\n"
    with pytest.raises(UserError, match="--shots 5 is more than the 4 examples"):
        draw_shots("t", 5, 5, 5, seed=1, from_items=True)


def test_mc_prompt_with_shots_is_lm_eval_layout():
    items = [McItem(f"Q{i}", ("x", "y"), i % 2) for i in range(3)]
    task = prepare_mc("t", items, None, EvalOptions(shots=1, seed=0))
    picks = draw_shots("t", 3, 3, 1, seed=0, from_items=True)
    for item, context, [j] in zip(task.items, task.contexts, picks):
        assert context == f"{items[j].query} {items[j].choices[items[j].gold]}\n\n{item.query}"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="known tasks: hellaswag, piqa, arc_easy"):
        task_names("piqa,hellaswagg")
    assert task_names("piqa, mc:x.jsonl,piqa") == ["piqa", "mc:x.jsonl"]


# --- `hybridlm eval run` end to end ---------------------------------------------------------------------

ALL_TASKS = "hellaswag,piqa,arc_easy,arc_challenge,lambada,wikitext2,sst2,alpaca_gen"


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "items.jsonl"
    rows = [{"context": f"Paragraph {i}: the value of x{i} is", "choices": [f" {i * 7 % 13}.", " 99."], "label": 0}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_run_json_shape_and_determinism(tiny_run, mc_file):
    shared_file(hellaswag.FILE)
    args = ("eval", "run", "--model", str(tiny_run), "--tasks", f"{ALL_TASKS},mc:{mc_file}", "--limit", "3",
            "--shots", "1", "--batch-size", "5", "--max-new-tokens", "8", "--dtype", "fp32", "--json")
    first = hybridlm(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    doc = json.loads(first.stdout)
    assert {k: doc[k] for k in ("model", "seed", "shots", "limit")} == {
        "model": str(tiny_run), "seed": 1234, "shots": 1, "limit": 3}
    assert list(doc["tasks"]) == [*ALL_TASKS.split(","), f"mc:{mc_file}"]
    mc = {"acc", "acc_norm", "acc_bytes"}
    expected = {"hellaswag": mc, "piqa": mc, "arc_easy": mc, "arc_challenge": mc, "lambada": {"acc", "perplexity"},
                "sst2": {"acc"}, "wikitext2": {"ppl", "bpb", "loss"}, "alpaca_gen": {"bleu", "rouge_l", "meteor", "exact_match"},
                f"mc:{mc_file}": mc}
    for name, result in doc["tasks"].items():
        assert set(result) == {"metrics", "n", "stderr"} and set(result["metrics"]) == expected[name], name
        assert set(result["stderr"]) <= set(result["metrics"]) and all(v >= 0 for v in result["stderr"].values())
        if name != "wikitext2":
            assert result["n"] == 3, name
    assert doc["tasks"]["lambada"]["metrics"]["perplexity"] > 1
    assert 0 <= doc["tasks"]["piqa"]["metrics"]["acc"] <= 1
    second = hybridlm(*args)
    assert second.stdout == first.stdout


def test_eval_run_wikitext2_ppl_and_bpb_agree(tiny_run):
    text = "".join(shared_file(wikitext.FILE).read_text(encoding="utf-8").splitlines(keepends=True)[:20])
    result = hybridlm("eval", "run", "--model", str(tiny_run), "--tasks", "wikitext2", "--limit", "20", "--stride",
                      "128", "--dtype", "fp32", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    task = json.loads(result.stdout)["tasks"]["wikitext2"]
    metrics, tokens = task["metrics"], task["n"]
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["bpb"] == pytest.approx(metrics["loss"] * tokens / math.log(2) / len(text.encode("utf-8")))


def test_eval_run_bad_input_is_one_line_and_exit_2(tiny_run, mc_file, tmp_path, cli):
    run = str(tiny_run)
    _bad(cli("eval", "run", "--model", run, "--tasks", "piqa,nope"), "unknown task 'nope'", "arc_challenge",
         "minerva_math500", "race", "groups: glue, superglue")
    _bad(cli("eval", "run", "--model", run, "--tasks", "gsm8k", "--limit", "0"), "--limit must be > 0")
    _bad(cli("eval", "run", "--model", run, "--tasks", "minerva_math500", "--shots", "5"),
         "--shots 5 is more than the 4 fixed Minerva examples")
    _bad(cli("eval", "run", "--model", run, "--tasks", "race,record", "--data-dir", str(tmp_path)),
         "race/test/high", "RACE.tar.gz")
    _bad(cli("eval", "run", "--model", run, "--tasks", "piqa", "--data-dir", str(tmp_path)),
         str(tmp_path / piqa.ITEMS), "--data-dir")
    _bad(cli("eval", "run", "--model", run, "--tasks", f"mc:{mc_file}", "--shots", "4"),
         "--shots 4 is more than the 3 examples")
    _bad(cli("eval", "run", "--model", str(tmp_path), "--tasks", f"mc:{mc_file}"),
         "not a hybridlm run directory")
    _bad(cli("eval", "run", "--model", run, "--tasks", f"mc:{tmp_path / 'none.jsonl'}"),
         "multiple-choice file not found")
