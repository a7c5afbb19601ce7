"""Progressive training: the batch-shape schedule, and runs that grow their shapes."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_MODEL

from hybridlm.errors import UserError
from hybridlm.train.config import load_run_config
from hybridlm.train.schedule import BatchSchedule
from hybridlm.train.trainer import train


def test_shapes_grow_linearly_and_settle():
    s = BatchSchedule(16, 256, grad_accum=2, world=2, batch_size_start=4, batch_ramp_steps=6,
                      seq_len_start=64, seq_len_warmup_steps=4)
    assert [s.batch_at(i) for i in range(8)] == [4, 6, 8, 10, 12, 14, 16, 16]
    assert [s.seq_len_at(i) for i in range(6)] == [64, 112, 160, 208, 256, 256]
    assert all(s.batch_at(i) % 2 == 0 for i in range(8)) and s.ramp_steps == 6


@pytest.mark.parametrize("kwargs", [
    {}, {"batch_size_start": 3, "batch_ramp_steps": 5}, {"seq_len_start": 16, "seq_len_warmup_steps": 7},
    {"batch_size_start": 1, "batch_ramp_steps": 9, "seq_len_start": 8, "seq_len_warmup_steps": 3, "grad_accum": 3},
])
def test_cumulative_counts_match_step_by_step_sums(kwargs):
    s = BatchSchedule(12, 64, **kwargs)
    rows = tokens = 0
    for step in range(20):
        assert (s.rows_before(step), s.tokens_before(step)) == (rows, tokens)
        rows += s.batch_at(step) * s.grad_accum
        tokens += s.batch_at(step) * s.grad_accum * s.seq_len_at(step)
    for budget in (1, 500, 5_000, 50_000):
        steps = s.steps_for_tokens(budget)
        assert s.tokens_before(steps) >= budget and (steps == 1 or s.tokens_before(steps - 1) < budget)


def test_world_size_must_divide_every_batch():
    with pytest.raises(UserError, match="divisible by the world size"):
        BatchSchedule(6, 32, world=4)
    with pytest.raises(UserError, match="batch_size_start"):
        BatchSchedule(8, 32, world=2, batch_size_start=3, batch_ramp_steps=2)


def _overrides(data, out, steps=12):
    return TINY_MODEL + [
        f"data.path={data}", f"train.out={out}", f"train.steps={steps}", "data.batch_size=4", "data.seq_len=32",
        "progressive.batch_size_start=2", "progressive.batch_ramp_steps=6", "progressive.seq_len_start=8",
        "progressive.seq_len_warmup_steps=6", "train.log_every=1", "checkpoint.every=5", "eval.every=0",
        "eval.tokens=256", "train.dtype=fp32", "schedule.warmup_steps=2", "optim.lr=3e-3",
    ]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_progressive_run_records_its_shapes_and_resumes_exactly(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cfg = load_run_config(None, _overrides(tiny_shards, run))
    summary = train(cfg, progress=False)
    records = [r for r in _records(run) if "loss" in r]
    assert [r["seq_len"] for r in records[:7]] == [8, 8, 16, 16, 24, 24, 32]
    assert [r["batch_size"] for r in records[:7]] == [2, 2, 2, 3, 3, 3, 4]
    expected = sum(r["seq_len"] * r["batch_size"] for r in records)
    assert records[-1]["tokens"] == summary["train_tokens"] == expected
    assert sum(records[-1]["tokens_by_source"].values()) == expected
    straight = [r["loss"] for r in records]
    shutil.rmtree(run / "checkpoints" / "step_12")
    (run / "model.safetensors").unlink()
    train(cfg, resume=True, progress=False)
    assert [r["loss"] for r in _records(run) if "loss" in r] == straight


def test_bad_progressive_settings_are_refused(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="seq_len_start must be in"):
        load_run_config(None, _overrides(tiny_shards, tmp_path / "r") + ["progressive.seq_len_start=64"])
    with pytest.raises(UserError, match="batch_ramp_steps > 0"):
        load_run_config(None, _overrides(tiny_shards, tmp_path / "r") + ["progressive.batch_ramp_steps=0"])
