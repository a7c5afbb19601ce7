"""Training bookkeeping: exact resume, killed runs, tampered checkpoints."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from hybridlm.errors import UserError
from hybridlm.run import load_run
from hybridlm.train.config import load_run_config
from hybridlm.train.trainer import train

MODEL = TINY_MODEL


@pytest.fixture
def data_dir(tiny_shards):
    return tiny_shards


def _config(data_dir: Path, out: Path, steps: int, every: int = 10):
    return load_run_config(None, MODEL + [
        f"data.path={data_dir}", f"train.out={out}", f"train.steps={steps}", "data.batch_size=4",
        "data.seq_len=32", "train.log_every=1", f"checkpoint.every={every}", "eval.every=0",
        "eval.tokens=256", "train.dtype=fp32", "schedule.warmup_steps=3", "optim.lr=3e-3",
    ])


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_after_ten_steps_gives_the_same_losses(data_dir, tmp_path):
    cfg = _config(data_dir, tmp_path / "run", 20)
    train(cfg, progress=False)
    straight = _losses(tmp_path / "run")
    assert sorted(straight) == list(range(1, 21))
    # Turn the finished run into one that stopped after step 10, then resume it.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_20")
    (tmp_path / "run" / "model.safetensors").unlink()
    train(cfg, resume=True, progress=False)
    assert _losses(tmp_path / "run") == straight


def test_sigkill_then_resume_continues_identically(data_dir, tmp_path):
    steps = 150
    reference = tmp_path / "reference"
    train(_config(data_dir, reference, steps, every=5), progress=False)
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "hybridlm", "train"] + MODEL + [
        f"data.path={data_dir}", f"train.out={killed}", f"train.steps={steps}", "data.batch_size=4",
        "data.seq_len=32", "train.log_every=1", "checkpoint.every=5", "eval.every=0",
        "eval.tokens=256", "train.dtype=fp32", "schedule.warmup_steps=3", "optim.lr=3e-3",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_20").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _losses(killed) == _losses(reference)


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_damaged_checkpoint_is_skipped_for_the_previous_one(damage, data_dir, tmp_path):
    cfg = _config(data_dir, tmp_path / "run", 20)
    train(cfg, progress=False)
    straight = _losses(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()
    if damage == "truncated":
        weights = tmp_path / "run" / "checkpoints" / "step_20" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # same size, still a valid safetensors file: only the hash can tell
        moments = tmp_path / "run" / "checkpoints" / "step_20" / "optimizer.safetensors"
        data = bytearray(moments.read_bytes())
        data[-1] ^= 0x01
        moments.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint step_20"):
        train(cfg, resume=True, progress=False)
    assert _losses(tmp_path / "run") == straight


def test_tampered_final_model_is_refused(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "run", 3), progress=False)
    weights = tmp_path / "run" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        load_run(tmp_path / "run")


def test_refuses_to_overwrite_a_run_without_resume(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "run", 2), progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(_config(data_dir, tmp_path / "run", 2), progress=False)


def test_loss_falls(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "run", 40), progress=False)
    losses = _losses(tmp_path / "run")
    assert losses[40] < losses[1] - 1.0


def test_compiled_training_follows_eager(data_dir, tmp_path):
    train(_config(data_dir, tmp_path / "eager", 3), progress=False)
    compiled_cfg = load_run_config(None, MODEL + [
        f"data.path={data_dir}", f"train.out={tmp_path / 'compiled'}", "train.steps=3", "data.batch_size=4",
        "data.seq_len=32", "train.log_every=1", "eval.every=0", "eval.tokens=256",
        "train.dtype=fp32", "schedule.warmup_steps=3", "optim.lr=3e-3", "train.compile=true",
    ])
    train(compiled_cfg, progress=False)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    assert compiled == pytest.approx(eager, rel=1e-4)
