"""Non-finite losses: a bad step is skipped with a warning; too many in a row stop the run."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file, save_file

from hybridlm.data.mixture import Mixture, WindowSource
from hybridlm.errors import TrainingStopped
from hybridlm.run import write_manifest
from hybridlm.train.config import load_run_config
from hybridlm.train.checkpoint import latest_valid_checkpoint
from hybridlm.train.trainer import train

BATCH, SEQ, SEED, STEPS = 4, 32, 1337, 30


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return TINY_MODEL + ["model.tie_embeddings=false"] + [
        f"data.path={data}", f"train.out={out}", f"train.steps={STEPS}", f"data.batch_size={BATCH}",
        f"data.seq_len={SEQ}", "train.log_every=1", "checkpoint.every=1", "checkpoint.keep=40",
        "eval.every=0", "eval.tokens=256", "train.dtype=fp32", "schedule.warmup_steps=2",
        "optim.lr=1e-3", f"train.seed={SEED}", *extra,
    ]


def _bad_steps(data: Path, token: int) -> list[bool]:
    """Which steps' inputs hold `token`, read from the same mixture the trainer draws from."""
    mixture = Mixture({str(data): WindowSource(data, "train", SEQ)}, {str(data): 1.0}, SEED)
    return [bool((mixture.rows(step * BATCH, BATCH, SEQ)[0] == token).any()) for step in range(STEPS)]


def _pick_token(data: Path) -> tuple[int, list[bool]]:
    """A token whose steps first go bad alone (skipped, then training goes on) and later twice in a row."""
    for token in range(260, 300):
        bad = _bad_steps(data, token)
        pairs = [s for s in range(1, STEPS) if bad[s - 1] and bad[s]]
        if pairs and any(bad[s] and not bad[s + 1] for s in range(pairs[0] - 1)):
            return token, bad
    raise AssertionError("no token of the tiny corpus has the pattern this test needs")


def test_bad_steps_are_skipped_and_a_bad_run_stops_with_checkpoints_intact(tiny_shards, tmp_path):
    parent = tmp_path / "parent"
    train(load_run_config(None, _overrides(tiny_shards, parent, "train.steps=2")), progress=False)
    token, bad = _pick_token(tiny_shards)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(parent, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    weights["tok_emb.weight"][token] = math.inf  # every input holding this token gives a NaN loss
    save_file(weights, poisoned / "model.safetensors")
    write_manifest(poisoned, ["model.safetensors", "config.json", "tokenizer.json"])

    run = tmp_path / "run"
    cfg = load_run_config(None, _overrides(tiny_shards, run, f"train.init_from={poisoned}", "train.max_bad_steps=2"))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingStopped, match="2 steps in a row"):
        warnings.simplefilter("always")
        train(cfg, progress=False)
    stop = next(s for s in range(1, STEPS) if bad[s - 1] and bad[s]) + 1  # 1-based step that stopped it
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if "skipped" in r]
    assert skipped == [s + 1 for s in range(stop) if bad[s]]
    assert len([w for w in caught if "non-finite loss" in str(w.message)]) == len(skipped)
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [s + 1 for s in range(stop) if not bad[s]]
    assert all(math.isfinite(r["loss"]) for r in trained)
    last = latest_valid_checkpoint(run)
    assert last is not None and last.name == f"step_{stop - 1}"
    assert not (run / "checkpoints" / f"step_{stop}").exists() and not (run / "model.safetensors").exists()
    kept = load_file(last / "model.safetensors")
    assert all(torch.isfinite(v).all() for k, v in kept.items() if k != "tok_emb.weight")
    assert torch.isfinite(torch.cat([kept["tok_emb.weight"][:token], kept["tok_emb.weight"][token + 1:]])).all()
    assert not kept["lm_head.weight"].equal(weights["lm_head.weight"])  # the good steps did train
