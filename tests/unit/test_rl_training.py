"""Online RL: advantages, the clipped surrogate and the k3 KL estimator by hand; a run on a
verifiable reward raises the held-out reward, reports its KL and clip fraction; bad rewards are
refused before training."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm.data import stdlib_docs
from hybridlm.data.instructions import BUILTIN_QA
from hybridlm.errors import UserError
from hybridlm.run import load_run
from hybridlm.tokenizer import TextTokenizer, train_tokenizer
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.metrics import read_metrics
from hybridlm.train.objectives.rl import clipped_policy_loss, group_advantages, k3_kl
from hybridlm.train.stage_data import build_stage_data
from hybridlm.train.trainer import train

MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    grpo = group_advantages(rewards, "grpo")
    std = math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3)  # unbiased, as TRL's
    assert grpo[0].tolist() == pytest.approx([(r - 3) / (std + 1e-4) for r in (1, 2, 3, 6)])
    assert grpo[1].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing
    rloo = group_advantages(rewards, "rloo")
    assert rloo[0].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])


def test_clipped_surrogate_and_k3_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([2.0, -1.0]), clip=0.2)
    # A > 0: min(r A, clip(r) A) caps the gain at 1.2 A; A < 0: the loss of a low ratio is kept at 0.8 A
    assert loss[0].tolist() == pytest.approx([-2.0, -2.4, -1.0])
    assert loss[1].tolist() == pytest.approx([1.0, 1.5, 0.8])
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    d = torch.tensor([0.0, 0.5, -0.5])
    assert k3_kl(torch.zeros(3), d).tolist() == pytest.approx([0.0, math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    train_tokenizer([t for q, a in stdlib_docs.qa_pairs() for t in (q, a)], vocab_size=600).save(root / "tok.json")
    train(_config(root / "sft", "sft", 60, tokenizer=root / "tok.json"), progress=False)
    return root / "sft"


def _config(out, objective: str, steps: int, tokenizer=None, **sections):
    train_section = {"objective": objective, "out": str(out), "steps": steps, "dtype": "fp32", "log_every": 1,
                     **sections.pop("train", {})}
    data = {"mixture": {BUILTIN_QA: 1.0}, "batch_size": 4, "seq_len": 64}
    if tokenizer:
        data["tokenizer"] = str(tokenizer)
    return run_config_from_dict({"model": MODEL, "train": train_section, "data": data, "optim": {"lr": 3e-3},
                                 "schedule": {"warmup_steps": 2}, "eval": {"every": 0},
                                 "checkpoint": {"every": steps}, **sections})


def test_rl_on_a_verifiable_reward_raises_the_held_out_reward(sft_run, tmp_path):
    rl = {"reward_function": "rl_rewards:e_share", "group_size": 4, "max_new_tokens": 16, "beta": 0.01,
          "updates_per_batch": 2}
    cfg = _config(tmp_path / "rl", "rl", 24, train={"init_from": str(sft_run)}, rl=rl).replace(data={"batch_size": 8})
    before = build_stage_data(cfg, TextTokenizer.load(sft_run / "tokenizer.json")).evaluate(
        load_run(sft_run).model, "fp32")["reward"]
    summary = train(cfg, progress=False)
    assert summary["val_reward"] > before + 0.05
    records = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "loss" in r]
    generated = [r for r in records if "reward_mean" in r]  # every other step: the samples are reused once
    assert [r["step"] for r in generated] == list(range(1, 25, 2))
    assert sum(r["reward_mean"] for r in generated[-4:]) > sum(r["reward_mean"] for r in generated[:4])
    assert all(r["kl"] >= 0 and 0 <= r["clip_fraction"] <= 1 for r in records)
    assert records[0]["kl"] < 1e-6 and max(r["kl"] for r in records) > 1e-3  # from the reference, then away
    assert any(r["clip_fraction"] > 0 for r in records if r["step"] % 2 == 0)  # reused samples: the clip acts
    assert all(0 < r["generation_s"] < r["step_s"] for r in generated)


def test_bad_rewards_are_refused_before_training(sft_run, tmp_path):
    cases = [({"reward_function": "rl_rewards:nothing"}, "cannot be imported"),
             ({"reward_function": "no_such_module:f"}, "cannot be imported"),
             ({"reward_function": "rl_rewards"}, "must be module:function"),
             ({"reward_function": "rl_rewards:not_callable"}, "is not callable"),
             ({"reward_function": "rl_rewards:one_value"}, "returned 1 values for 2 completions"),
             ({"reward_model": str(sft_run)}, "is not a reward model")]
    for rl, needle in cases:
        with pytest.raises(UserError, match=needle):
            train(_config(tmp_path / "x", "rl", 2, train={"init_from": str(sft_run)}, rl=rl), progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="an rl run needs a reward"):
        _config(tmp_path / "x", "rl", 2, train={"init_from": str(sft_run)})
    with pytest.raises(UserError, match="rl.clip acts only when rl.updates_per_batch > 1"):
        _config(tmp_path / "x", "rl", 2, rl={"reward_function": "rl_rewards:e_share", "clip": 0.1})
