"""DPO against TRL's DPOTrainer: on the same GPT-2-shaped model exported with `export hf --format
gpt2` and the same pairs, our loss, implicit rewards and every parameter's gradient equal what
TRL's own `compute_loss` gives (fp32); our cached reference log-probabilities equal a live pass."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hf_families import make_run
from hybridlm.config import ModelConfig
from hybridlm.data.pair_rows import EncodedPair, pair_batches
from hybridlm.interop.hf_export import export_hf, gpt2_names
from hybridlm.run import load_run, save_final
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.config import DataConfig, DPOConfig, RunConfig, TrainConfig
from hybridlm.train.objectives import OBJECTIVES, StepContext
from hybridlm.train.reference_logps import pair_logps, reference_logps

trl = pytest.importorskip("trl")

GPT2_SHAPED = {"n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 48, "max_seq_len": 64, "layer_pattern": "DD",
               "position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True}
SEQ_LEN = 40


def _pairs(vocab: int, count: int = 6) -> list[EncodedPair]:
    """Random token pairs of different lengths (short enough that nothing is truncated)."""
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(8, vocab) for _ in range(n)]  # noqa: E731 - past the special ids
    return [EncodedPair(ids(rng.randint(3, 12)), ids(rng.randint(2, 14)), ids(rng.randint(2, 14)))
            for _ in range(count)]


def _policy_run(reference: Path, root: Path) -> Path:
    """A copy of the reference run with its weights moved, so policy and reference differ."""
    run = load_run(reference)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = root / "policy"
    out.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (out / name).write_bytes((reference / name).read_bytes())
    save_final(out, run.model)
    return out


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_parity")
    tokenizer = TextTokenizer.load(tiny_run / "tokenizer.json")
    reference = make_run(root / "ref", ModelConfig(vocab_size=tokenizer.vocab_size, **GPT2_SHAPED),
                         tiny_run / "tokenizer.json")
    policy = _policy_run(reference, root)
    for run, name in ((reference, "reference_hf"), (policy, "policy_hf")):
        export_hf(run, root / name, "gpt2")
    return reference, policy, tokenizer, root


def _trl_side(policy_hf: Path, reference_hf: Path, pairs: list[EncodedPair], beta: float, loss: str, out: Path):
    """Loss, metrics and gradients from TRL's DPOTrainer.compute_loss on the exported models."""
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel

    policy = GPT2LMHeadModel.from_pretrained(policy_hf, dtype=torch.float32)
    reference = GPT2LMHeadModel.from_pretrained(reference_hf, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(out), beta=beta, loss_type=[loss], report_to="none", use_cpu=True,
                         max_length=None, bf16=False, precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             processing_class=AutoTokenizer.from_pretrained(policy_hf),
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    inputs = trainer.data_collator([{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected}
                                    for p in pairs])
    policy.train()
    value = trainer.compute_loss(policy, inputs)
    value.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(value), metrics, {n: p.grad for n, p in policy.named_parameters()}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_rewards_and_gradients_equal_trl(runs, loss, tmp_path):
    reference, policy, tokenizer, root = runs
    pairs = _pairs(tokenizer.vocab_size)
    pad = tokenizer.special_ids["pad"]
    ref_N2, record = reference_logps(reference, tokenizer, pairs, SEQ_LEN, "fp32", str(tmp_path / "cache"))
    assert not record["hit"]
    cfg = RunConfig(model=load_run(policy).model.cfg, train=TrainConfig(objective="dpo"), data=DataConfig(seq_len=SEQ_LEN),
                    dpo=DPOConfig(beta=0.3, loss=loss))
    model = load_run(policy).model.train()
    ids, targets, last = next(pair_batches(pairs, SEQ_LEN, pad, len(pairs)))
    ours = OBJECTIVES["dpo"].loss(model, (ids, targets, last, ref_N2), StepContext(cfg, tokenizer, model, {}))
    ours.backward()

    theirs, metrics, grads = _trl_side(root / "policy_hf", root / "reference_hf", pairs, 0.3, loss,
                                       tmp_path / "trl")
    assert float(ours) == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    policy_N2 = pair_logps(model, pairs, SEQ_LEN, pad, "fp32")
    rewards = 0.3 * (policy_N2 - ref_N2)
    assert float(rewards[:, 0].mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(rewards[:, 1].mean()) == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert float(policy_N2[:, 0].mean()) == pytest.approx(metrics["logps/chosen"], rel=1e-5)
    ours_grads = dict(model.named_parameters())
    for mine, hf, transposed in gpt2_names(cfg.model.n_layer):
        grad = ours_grads[mine].grad
        torch.testing.assert_close(grad.T if transposed else grad, grads[hf], atol=1e-5, rtol=1e-4, msg=mine)


def test_cached_reference_logps_equal_a_live_pass_and_are_reused(runs, tmp_path):
    reference, policy, tokenizer, _ = runs
    pairs = _pairs(tokenizer.vocab_size, count=9)
    pad = tokenizer.special_ids["pad"]
    first, made = reference_logps(reference, tokenizer, pairs, SEQ_LEN, "fp32", str(tmp_path))
    again, hit = reference_logps(reference, tokenizer, pairs, SEQ_LEN, "fp32", str(tmp_path))
    live = pair_logps(load_run(reference).model, pairs, SEQ_LEN, pad, "fp32")
    assert not made["hit"] and hit["hit"] and hit["file"] == made["file"]
    assert torch.equal(first, live) and torch.equal(again, live)
    other, moved = reference_logps(policy, tokenizer, pairs, SEQ_LEN, "fp32", str(tmp_path))
    assert not moved["hit"] and moved["file"] != made["file"] and not torch.equal(other, live)
    shorter, cut = reference_logps(reference, tokenizer, pairs[:-1], SEQ_LEN, "fp32", str(tmp_path))
    assert not cut["hit"] and torch.equal(shorter, live[:-1])
