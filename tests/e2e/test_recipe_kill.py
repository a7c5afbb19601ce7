"""A recipe killed with SIGKILL in the middle of its second stage continues exactly when rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from hybridlm.train.recipe import load_recipe, run_recipe

STAGE_STEPS = 150


def _recipe(path: Path, data: Path, out: Path) -> Path:
    path.write_text(f'''
[model]
preset = "tiny"
n_layer = 2
d_model = 64
window = 8
stride = 8
[recipe]
out = "{out}"
[train]
dtype = "fp32"
log_every = 1
[data]
path = "{data}"
batch_size = 4
seq_len = 32
[eval]
every = 0
tokens = 256
[checkpoint]
every = 5
[schedule]
warmup_steps = 3
[[stage]]
name = "first"
tokens = {20 * 4 * 32}
optim.lr = 3e-3
[[stage]]
name = "second"
tokens = {STAGE_STEPS * 4 * 32}
optim.lr = 1e-3
''')
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigkill_mid_stage_then_rerun_continues_identically(tiny_shards, tmp_path):
    reference = tmp_path / "reference"
    run_recipe(load_recipe(_recipe(tmp_path / "ref.toml", tiny_shards, reference)), progress=False)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "hybridlm", "train", "--recipe",
               str(_recipe(tmp_path / "killed.toml", tiny_shards, killed))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "2-second" / "checkpoints" / "step_20"
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the recipe finished before it could be killed"
    assert (killed / "1-first" / "model.safetensors").exists()
    assert not (killed / "2-second" / "model.safetensors").exists()
    done = subprocess.run(command + ["--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stages = json.loads(done.stdout)["stages"]
    assert [s.get("skipped", False) for s in stages] == [True, False]
    assert _losses(killed / "2-second") == _losses(reference / "2-second")
    assert len(_losses(killed / "2-second")) == STAGE_STEPS
