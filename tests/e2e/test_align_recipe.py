"""The alignment recipe end to end on a tiny model: sft -> rm -> dpo -> rl, each stage from the
right parent with both parents in its lineage; killed with SIGKILL in the middle of the rm, the
dpo and the rl stage, each rerun continues with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from hybridlm.data import stdlib_docs
from hybridlm.fileio import read_json
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.recipe import load_recipe, run_recipe

STEPS = {"sft": 12, "rm": 16, "dpo": 16, "rl": 8}
ROWS = 4 * 64  # batch 4 x seq_len 64: the tokens of one step


def _recipe(path: Path, out: Path, tokenizer: Path, cache: Path) -> Path:
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
tokenizer = "{tokenizer}"
batch_size = 4
seq_len = 64
[eval]
every = 0
[checkpoint]
every = 4
[[stage]]
name = "sft"
tokens = {STEPS["sft"] * ROWS}
train.objective = "sft"
data.mixture = {{ "stdlib-docs:qa" = 1.0 }}
optim.lr = 3e-3
[[stage]]
name = "rm"
parent = "sft"
tokens = {STEPS["rm"] * ROWS}
train.objective = "rm"
data.mixture = {{ "stdlib-docs:prefs" = 1.0 }}
optim.lr = 1e-3
[[stage]]
name = "dpo"
parent = "sft"
tokens = {STEPS["dpo"] * ROWS}
train.objective = "dpo"
data.mixture = {{ "stdlib-docs:prefs" = 1.0 }}
optim.lr = 1e-3
dpo.reference_cache = "{cache}"
[[stage]]
name = "rl"
parent = "sft"
tokens = {STEPS["rl"] * ROWS}
train.objective = "rl"
data.mixture = {{ "stdlib-docs:qa" = 1.0 }}
optim.lr = 1e-3
rl.reward_model = "stage:rm"
rl.max_new_tokens = 12
rl.beta = 0.05
rl.updates_per_batch = 2
''')
    return path


def test_builtin_align_recipe_plans_every_stage_from_the_sft_stage():
    stages = load_recipe("align", ["recipe.out=/x"])
    assert [s.name for s in stages] == [*STEPS]
    assert [s.run.train.objective for s in stages] == ["sft", "rm", "dpo", "rl"]
    assert [s.run.train.init_from for s in stages] == ["", "/x/1-sft", "/x/1-sft", "/x/1-sft"]
    assert stages[3].run.rl.reward_model == "/x/2-rm"


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _kill_at(command: list[str], marker: Path) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the recipe finished before {marker} appeared"
    assert not (marker.parent.parent / "model.safetensors").exists()


def test_align_recipe_stages_start_from_the_right_parents_and_resume_exactly_after_sigkill(tmp_path):
    tokenizer = tmp_path / "tok.json"
    train_tokenizer([t for q, a in stdlib_docs.qa_pairs() for t in (q, a)], vocab_size=600).save(tokenizer)
    reference = tmp_path / "reference"
    summaries = run_recipe(load_recipe(_recipe(tmp_path / "ref.toml", reference, tokenizer, tmp_path / "c1")),
                           progress=False)
    assert [s["objective"] for s in summaries] == ["sft", "rm", "dpo", "rl"]
    sft = str(reference / "1-sft")
    for stage in ("2-rm", "3-dpo", "4-rl"):
        assert read_json(reference / stage / "lineage.json", "lineage")["parent_run"] == sft
    rl_source = read_json(reference / "4-rl" / "lineage.json", "lineage")["sources"][0]
    assert rl_source["reward_model"] == str(reference / "2-rm")
    assert read_json(reference / "3-dpo" / "lineage.json", "lineage")["sources"][0]["reference"] == sft
    assert summaries[1]["val_accuracy"] > 0.5 and summaries[2]["val_rewards/accuracies"] > 0.5

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "hybridlm", "train", "--recipe",
               str(_recipe(tmp_path / "killed.toml", killed, tokenizer, tmp_path / "c2"))]
    for stage in ("2-rm", "3-dpo", "4-rl"):
        _kill_at(command, killed / stage / "checkpoints" / "step_4")
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [s.get("skipped", False) for s in json.loads(done.stdout)["stages"]] == [True, True, True, False]
    for stage, steps in zip(("1-sft", "2-rm", "3-dpo", "4-rl"), STEPS.values()):
        assert _losses(killed / stage) == _losses(reference / stage), stage
        assert len(_losses(killed / stage)) == steps
