"""Preference data (hh-rlhf on real lines, JSONL, the built-in pairs), the Bradley-Terry and DPO
losses by hand, and reward-model and DPO runs that learn the built-in preference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import shared_file
from hybridlm.data import stdlib_docs
from hybridlm.data.instructions import BUILTIN_QA
from hybridlm.data.pair_rows import EncodedPair, pair_row
from hybridlm.data.preferences import BUILTIN_PREFS, builtin_pairs, read_preferences
from hybridlm.errors import UserError
from hybridlm.fileio import read_json
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.run import load_run
from hybridlm.tokenizer import train_tokenizer
from hybridlm.tokenizer.chat import Message
from hybridlm.train.config import DPOConfig, run_config_from_dict
from hybridlm.train.objectives.dpo import dpo_losses
from hybridlm.train.objectives.rm import bradley_terry_loss, reward_figures
from hybridlm.train.trainer import train

HH = "preference/hh-rlhf/harmless-base/test.jsonl.gz"
MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}


@pytest.fixture(scope="module")
def qa_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([t for q, a in stdlib_docs.qa_pairs() for t in (q, a)], vocab_size=800).save(path)
    return path


def _run(tokenizer, out, objective: str, steps: int, **sections) -> dict:
    doc = {"model": MODEL, "train": {"objective": objective, "out": str(out), "steps": steps, "dtype": "fp32",
                                     **sections.pop("train", {})},
           "data": {"mixture": {BUILTIN_PREFS: 1.0}, "tokenizer": str(tokenizer), "batch_size": 8, "seq_len": 96},
           "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 5}, "eval": {"every": 0},
           "checkpoint": {"every": steps}, **sections}
    return train(run_config_from_dict(doc), progress=False)


def test_hh_rlhf_splits_on_the_last_assistant_turn_and_names_unshared_pairs():
    path = shared_file(HH)
    with pytest.raises(UserError, match=r"5 pair\(s\).*line 1255, 1689, 1951.*unshared_pairs"):
        read_preferences(str(path))
    found = read_preferences(str(path), unshared="skip")
    assert len(found.pairs) == 2307 and found.skipped_lines[:3] == [1255, 1689, 1951]
    first = found.pairs[0]  # three human turns; the prompt ends with the third
    assert [m.role for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0].content == "what are some pranks with a pen i can do?"
    assert first.prompt[-1].content == "okay some of these do not have anything to do with pens"
    assert first.chosen.startswith("No, sorry!  All of these involve a pen") and first.chosen != first.rejected


def test_jsonl_pairs_take_strings_or_message_lists_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "no"}) + "\n")
    pairs = read_preferences(str(good)).pairs
    assert pairs[0].prompt == (Message("user", "hi"),) and pairs[0].rejected == "go away"
    assert pairs[1].prompt[0] == Message("system", "be kind") and pairs[1].chosen == "hello"
    for line, needle in [("{not json", "line 2 is not valid JSON"),
                         (json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"}), "line 2: 'chosen' must be"),
                         (json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}),
                          "line 2: the last message of 'chosen' must be the assistant's"),
                         (json.dumps({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}),
                          "line 2: an hh-rlhf dialogue must end with")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text().splitlines()[0] + "\n" + line + "\n")
        with pytest.raises(UserError, match=needle):
            read_preferences(str(bad))


def test_builtin_pairs_prefer_the_documented_sentence_over_its_shuffled_words():
    pairs = builtin_pairs()
    assert len(pairs) > 1000
    for pair in pairs[:50]:
        assert sorted(pair.chosen.split()) == sorted(pair.rejected.split()) and pair.chosen != pair.rejected
    assert builtin_pairs()[:20] == pairs[:20]  # deterministic


def test_pair_rows_score_only_the_reply_and_keep_its_end_when_the_prompt_is_long():
    pair = EncodedPair(prompt=list(range(10, 40)), chosen=[50, 51, 52], rejected=[60])
    ids, targets, last = pair_row(pair, seq_len=12, pad_id=0)
    assert ids[0].tolist()[-3:] == [50, 51, 52] and last.tolist() == [11, 11]
    assert [t for t in targets[0].tolist() if t != IGNORE_INDEX] == [50, 51, 52]
    assert ids[0].tolist()[:9] == list(range(31, 40))  # the oldest prompt tokens went first
    assert ids[1].tolist() == list(range(29, 40)) + [60]
    assert [t for t in targets[1].tolist() if t != IGNORE_INDEX] == [60]


def test_bradley_terry_and_dpo_losses_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    by_hand = -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5) + math.log(1 / (1 + math.exp(1)))) / 3
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(by_hand)
    assert float(bradley_terry_loss(chosen, rejected, margin=1.0)) == pytest.approx(
        (math.log(2) + math.log(1 + math.e) + math.log(1 + math.e ** 2)) / 3)  # differences 0, -1, -2
    assert float(bradley_terry_loss(chosen, rejected, center=0.5)) == pytest.approx(by_hand + 0.5 * (1 + 0 + 25) / 3)
    figures = reward_figures(chosen, rejected)
    assert figures["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert figures["margin"] == pytest.approx(0.0) and figures["reward_mean"] == pytest.approx(1.0)

    policy, reference = torch.tensor([[-3.0, -5.0]]), torch.tensor([[-4.0, -4.0]])
    delta = 0.5 * ((-3 + 4) - (-5 + 4))
    losses, rewards = dpo_losses(policy, reference, torch.tensor([[2, 4]]), DPOConfig(beta=0.5, label_smoothing=0.2))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert float(losses[0]) == pytest.approx(-0.8 * math.log(sig(delta)) - 0.2 * math.log(sig(-delta)))
    assert rewards.tolist() == [[0.5, -0.5]]
    ipo, _ = dpo_losses(policy, reference, torch.tensor([[2, 4]]), DPOConfig(beta=0.5, loss="ipo"))
    assert float(ipo[0]) == pytest.approx((1 / 2 - (-1) / 4 - 1) ** 2)


def test_reward_model_learns_the_builtin_preference_on_held_out_pairs(qa_tokenizer, tmp_path):
    summary = _run(qa_tokenizer, tmp_path / "rm", "rm", 150)
    assert summary["val_accuracy"] > 0.8 and summary["val_margin"] > 1.0  # chance is 0.5
    run = load_run(tmp_path / "rm")
    assert run.model.cfg.head == "reward" and run.model.reward_head is not None
    lineage = read_json(tmp_path / "rm" / "lineage.json", "lineage")
    assert lineage["sources"][0]["held_out"] == len(builtin_pairs()) // 5


def test_dpo_learns_the_preference_from_its_sft_parent_and_reuses_the_cached_reference(qa_tokenizer, tmp_path):
    sft = {"mixture": {BUILTIN_QA: 1.0}, "tokenizer": str(qa_tokenizer), "batch_size": 8, "seq_len": 96}
    _run(qa_tokenizer, tmp_path / "sft", "sft", 40, data=sft)
    dpo = {"train": {"init_from": str(tmp_path / "sft")}, "dpo": {"reference_cache": str(tmp_path / "cache")},
           "optim": {"lr": 1e-3}}
    summary = _run(qa_tokenizer, tmp_path / "dpo", "dpo", 40, **dpo)
    assert summary["val_rewards/accuracies"] > 0.8 and summary["val_rewards/margins"] > 0
    first = read_json(tmp_path / "dpo" / "lineage.json", "lineage")["sources"][0]["reference_logps"]
    assert not first["hit"] and first["reference_weights_sha256"]
    again = _run(qa_tokenizer, tmp_path / "dpo2", "dpo", 2, **dpo)
    second = read_json(tmp_path / "dpo2" / "lineage.json", "lineage")["sources"][0]["reference_logps"]
    assert second["hit"] and second["file"] == first["file"] and again["steps"] == 2


def test_objective_sections_and_heads_that_do_not_fit_are_refused(qa_tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"dpo.beta is set but train.objective is rm"):
        _run(qa_tokenizer, tmp_path / "a", "rm", 1, dpo={"beta": 0.2})
    with pytest.raises(UserError, match="a dpo run needs a reference policy"):
        _run(qa_tokenizer, tmp_path / "b", "dpo", 1)
    _run(qa_tokenizer, tmp_path / "rm", "rm", 2)
    with pytest.raises(UserError, match="is a reward model; a lm run starts from a language model"):
        _run(qa_tokenizer, tmp_path / "c", "dpo", 1, train={"init_from": str(tmp_path / "rm")},
             dpo={"reference_cache": str(tmp_path / "cache")})
    with pytest.raises(UserError, match="model.head = 'reward' does not fit train.objective = 'sft'"):
        train(run_config_from_dict({"model": {**MODEL, "head": "reward"}, "train": {
            "objective": "sft", "out": str(tmp_path / "d"), "steps": 1}, "data": {
            "mixture": {BUILTIN_QA: 1.0}, "tokenizer": str(qa_tokenizer), "seq_len": 96}}), progress=False)


def test_rm_score_scores_replies_and_pairs_and_refuses_a_language_model(qa_tokenizer, tmp_path):
    import subprocess
    import sys

    from hybridlm.eval.reward_scores import score_file

    _run(qa_tokenizer, tmp_path / "rm", "rm", 150)
    pair = builtin_pairs()[4]  # held out (4 % 5 == 4)
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"prompt": pair.prompt[0].content, "response": pair.chosen}) + "\n"
                     + json.dumps({"prompt": pair.prompt[0].content, "chosen": pair.chosen,
                                   "rejected": pair.rejected}) + "\n")
    result = score_file(tmp_path / "rm", lines, tmp_path / "out.jsonl", "fp32")
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert result["lines"] == 2 and result["pairs"] == 1 and result["accuracy"] == 1.0
    assert scored[0]["reward"] == pytest.approx(scored[1]["reward_chosen"], abs=1e-4)
    assert scored[1]["reward_chosen"] > scored[1]["reward_rejected"]
    done = subprocess.run([sys.executable, "-m", "hybridlm", "rm", "score", "--model", str(tmp_path / "rm"),
                           "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'} not found; give a JSONL file of {{prompt, response}} or "
        "{prompt, chosen, rejected}"]
