"""Instruction tuning (chat template, loss masking, held-out loss) and multi-stage recipes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_file
from hybridlm.data.instructions import read_conversations
from hybridlm.data.mixture import padded_row
from hybridlm.data.prepare import prepare
from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.run import load_run
from hybridlm.tokenizer import TextTokenizer, train_tokenizer
from hybridlm.tokenizer.chat import Message, render_chat
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.metrics import read_metrics
from hybridlm.train.recipe import plan_stages, run_recipe
from hybridlm.train.stage_data import build_stage_data
from hybridlm.train.trainer import train

MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}
ALPACA = "instruct/codealpaca/code_alpaca_2k.json"


@pytest.fixture(scope="module")
def alpaca_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [m.content for c in read_conversations(str(shared_file(ALPACA))) for m in c]
    train_tokenizer(texts, vocab_size=600).save(path)
    return path


def test_chat_template_trains_only_on_replies(alpaca_tokenizer):
    tok = TextTokenizer.load(alpaca_tokenizer)
    conv = [Message("system", "be brief"), Message("user", "add 2 and 3"), Message("assistant", "5"),
            Message("user", "and <|end|> 1?"), Message("assistant", "6")]
    ids, trained = render_chat(tok, conv)
    sp = tok.special_ids
    assert ids[0] == sp["system"] and ids.count(sp["end"]) == 5  # the "<|end|>" inside text stays text
    kept = [i for i, t in zip(ids, trained) if t]
    assert kept == tok.encode("5") + [sp["end"]] + tok.encode("6") + [sp["end"]]
    x, y = padded_row(ids, trained, seq_len=64, pad_id=sp["pad"])
    assert x[: len(ids) - 1].tolist() == ids[:-1] and (x[len(ids) - 1:] == sp["pad"]).all()
    assert [int(t) for t in y if t != IGNORE_INDEX] == kept


def test_sft_loss_counts_only_reply_tokens_and_held_out_loss_falls(alpaca_tokenizer, tmp_path):
    cfg = run_config_from_dict({"model": MODEL, "train": {
        "objective": "sft", "out": str(tmp_path / "sft"), "steps": 60, "dtype": "fp32", "log_every": 10},
        "data": {"mixture": {str(shared_file(ALPACA)): 1.0}, "tokenizer": str(alpaca_tokenizer), "batch_size": 8,
                 "seq_len": 128},
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 5}, "eval": {"every": 0}, "checkpoint": {"every": 60}})
    data = build_stage_data(cfg, TextTokenizer.load(alpaca_tokenizer))
    x, y = data.mixture.rows(0, 8, 128)
    torch.manual_seed(0)
    model = HybridLM(dataclasses.replace(cfg.model, vocab_size=600))
    fused = model(x, targets_BT=y)
    logits = model(x)
    keep = y != IGNORE_INDEX
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(fused, F.cross_entropy(logits[keep], y[keep]), atol=1e-5, rtol=1e-5)
    before = data.evaluate(model, "fp32")["loss"]
    result = train(cfg, progress=False)
    assert result["val_loss"] < before - 1.0, (before, result["val_loss"])
    assert result["val_by_source"][str(shared_file(ALPACA))]["tokens"] > 1000  # 100 held-out examples scored


def test_gradient_accumulation_weights_every_reply_token_equally(alpaca_tokenizer, tmp_path):
    """Rows of 4 in one micro-batch, or in 2 or 4 micro-batches with different numbers of reply
    tokens: the same step losses and the same weights (the mean over all scored tokens of a step)."""
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch_size}x{grad_accum}"
        train(run_config_from_dict({"model": MODEL, "train": {
            "objective": "sft", "out": str(out), "steps": 4, "dtype": "fp32", "log_every": 1},
            "data": {"mixture": {str(shared_file(ALPACA)): 1.0}, "tokenizer": str(alpaca_tokenizer),
                     "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": 128},
            "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}, "eval": {"every": 0},
            "checkpoint": {"every": 4}}), progress=False)
        runs[(batch_size, grad_accum)] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r],
                                          load_run(out).model.state_dict())
    data = build_stage_data(run_config_from_dict({"model": MODEL, "train": {
        "objective": "sft", "out": str(tmp_path / "unused")}, "data": {
        "mixture": {str(shared_file(ALPACA)): 1.0}, "tokenizer": str(alpaca_tokenizer), "seq_len": 128}}),
        TextTokenizer.load(alpaca_tokenizer))
    _, y = data.mixture.rows(0, 4, 128)
    assert len({int((row != IGNORE_INDEX).sum()) for row in y}) > 1  # the rows' reply lengths differ
    losses, weights = runs[(4, 1)]
    for key in ((2, 2), (1, 4)):
        assert runs[key][0] == pytest.approx(losses, rel=1e-5), key
        for name, tensor in weights.items():
            torch.testing.assert_close(runs[key][1][name], tensor, rtol=1e-4, atol=1e-5)


def test_second_stage_starts_from_the_first_stage_weights(alpaca_tokenizer, tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"Paragraph {i}: x{i} is {i * 7 % 13}.\n\n" for i in range(600)))
    prepare([str(tmp_path / "in.txt")], alpaca_tokenizer, tmp_path / "data")
    recipe = {"model": MODEL, "recipe": {"out": str(tmp_path / "r"), "total_tokens": 1280},
              "data": {"batch_size": 4, "seq_len": 32, "mixture": {str(tmp_path / "data"): 1.0}},
              "eval": {"every": 0}, "checkpoint": {"every": 5}, "train": {"dtype": "fp32"},
              "optim": {"weight_decay": 0.0},
              "stage": [{"name": "one", "fraction": 0.9, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}},
                        {"name": "two", "tokens": 128, "optim": {"lr": 1e-12}, "schedule": {"warmup_steps": 0}}]}
    stages = plan_stages(recipe)
    assert [s.run.train.steps for s in stages] == [9, 1]
    summaries = run_recipe(stages, progress=False)
    one, two = (load_run(tmp_path / "r" / name) for name in ("1-one", "2-two"))
    for (name, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0, msg=name)
    assert json.loads((tmp_path / "r" / "2-two" / "lineage.json").read_text())["parent_run"] == str(tmp_path / "r" / "1-one")
    assert summaries[1]["val_loss"] == pytest.approx(summaries[0]["val_loss"], abs=1e-6)
    again = run_recipe(stages, progress=False)  # finished stages are found, not retrained
    assert all(s["skipped"] for s in again)


def test_paper_recipe_plans_the_80_15_5_split_with_the_paper_learning_rates():
    from pathlib import Path

    from hybridlm.train.recipe import load_recipe

    stages = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "paper-3stage.toml")
    assert [s.name for s in stages] == ["broad", "focused", "instruct"]
    steps = [s.run.train.steps for s in stages]
    shares = [n / sum(steps) for n in steps]
    assert shares == pytest.approx([0.80, 0.15, 0.05], abs=0.005)
    assert [s.run.optim.lr for s in stages] == [3e-4, 1e-4, 5e-5]
    assert [s.run.train.objective for s in stages] == ["clm", "clm", "sft"]
    assert stages[1].run.train.init_from == stages[0].run.train.out


def test_the_builtin_recipe_by_name_is_the_file_and_the_quickstart_resizes_it(tmp_path):
    """One copy of the three-stage recipe: `--recipe paper-3stage` reads the file under recipes/,
    and the quickstart's stages keep its shares, objectives, mixtures (moved under its directory)
    and learning-rate ratios."""
    from pathlib import Path

    from hybridlm.quickstart import quickstart_recipe
    from hybridlm.train.recipe import load_recipe

    by_name = load_recipe("paper-3stage")
    by_path = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "paper-3stage.toml")
    assert [s.run for s in by_name] == [s.run for s in by_path]
    quick = plan_stages(quickstart_recipe("small", tmp_path))
    assert [s.name for s in quick] == [s.name for s in by_name]
    assert [s.run.train.objective for s in quick] == [s.run.train.objective for s in by_name]
    assert [list(s.run.data.mixture) for s in quick] == [
        [str(tmp_path / "data" / Path(spec).name) if spec.startswith("runs/") else spec for spec in s.run.data.mixture]
        for s in by_name]
    steps = [s.run.train.steps for s in quick]
    assert [n / sum(steps) for n in steps] == pytest.approx([0.80, 0.15, 0.05], abs=0.005)
    ratios = [s.run.optim.lr / quick[0].run.optim.lr for s in quick]
    assert ratios == pytest.approx([s.run.optim.lr / by_name[0].run.optim.lr for s in by_name], rel=1e-12)
    assert quick[1].run.optim.lr == 1e-3 / 3 and quick[2].run.optim.lr == 1e-3 / 6


def test_the_quickstart_warns_first_where_training_cannot_run_in_bf16():
    """The presets are sized for a CPU with bf16 matmul; elsewhere (fp32 training) the small
    preset's wait is announced, with the way out, and the tiny preset goes without a note."""
    from hybridlm.device import default_device, resolve_dtype
    from hybridlm.quickstart import speed_hint

    assert speed_hint("tiny") is None
    hint = speed_hint("small")
    if resolve_dtype("auto", default_device()) == "bf16":
        assert hint is None
    else:
        assert "fp32" in hint and "--preset tiny" in hint
