"""Scale-out through real torchrun subprocesses (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL, one_line_error, shared_file

from hybridlm.train.config import load_run_config
from hybridlm.train.trainer import train

STEPS = 10


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return TINY_MODEL + [
        f"data.path={data}", f"train.out={out}", f"train.steps={STEPS}", "data.batch_size=4", "data.seq_len=32",
        "train.log_every=1", "checkpoint.every=5", "eval.every=0", "eval.tokens=256",
        "train.dtype=fp32", "schedule.warmup_steps=3", "optim.lr=3e-3", *extra,
    ]


def _torchrun(nproc: int, overrides: list[str], *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hybridlm", "train", *flags, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def single(tiny_shards, tmp_path_factory) -> list[float]:
    """The reference: one process, the same global batch of 4 rows."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(load_run_config(None, _overrides(tiny_shards, out)), progress=False)
    return _losses(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_one_process(parallel, single, tiny_shards, tmp_path):
    done = _torchrun(2, _overrides(tiny_shards, tmp_path / "run", f"parallel.strategy={parallel}"), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # only rank 0 prints
    assert summary["world_size"] == 2
    losses = _losses(tmp_path / "run")
    assert len(losses) == STEPS
    assert losses == pytest.approx(single, rel=1e-4)
    assert losses[-1] < losses[0] - 1.0


def _ranks_then_one(single: list[float], data: Path, run: Path, *layout: str, ranks: int = 2) -> None:
    """Train on `ranks` processes in `layout`: the one-process losses; then drop the last checkpoint
    and the final weights and resume on one process from step 5: the same losses again, and the
    same final validation loss as the ranks evaluated together."""
    done = _torchrun(ranks, _overrides(data, run, *layout), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["world_size"] == ranks
    assert _losses(run) == pytest.approx(single, rel=1e-4)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS}")
    (run / "model.safetensors").unlink()
    resumed = train(load_run_config(None, _overrides(data, run)), resume=True, progress=False)
    assert _losses(run) == pytest.approx(single, rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


def test_tensor_parallel_follows_one_process_and_its_checkpoint_resumes_on_one(single, tiny_shards, tmp_path):
    """Heads, FFN units and the global slots split over two ranks (gloo), fp32: the loss curve of one
    process; the run's step-5 checkpoint (saved in the single-process layout) then continues on one
    process with the same losses."""
    _ranks_then_one(single, tiny_shards, tmp_path / "tp", "parallel.strategy=tp")


def test_tensor_parallel_with_fsdp_on_a_2d_mesh_follows_one_process(single, tiny_shards, tmp_path):
    """Four processes as a (dp 2, tp 2) mesh: each pair splits the blocks, FSDP2 shards across the
    pairs, which read different rows; the one-process losses, and a checkpoint that resumes on one."""
    _ranks_then_one(single, tiny_shards, tmp_path / "2d", "parallel.strategy=tp", "parallel.tp_degree=2", ranks=4)


def test_tensor_parallel_degree_must_divide_the_heads(tiny_shards, tmp_path):
    overrides = _overrides(tiny_shards, tmp_path / "tp", "parallel.strategy=tp", "model.n_head=1", "model.n_kv_head=1")
    done = subprocess.run([sys.executable, "-m", "hybridlm", "train", "--nproc-per-node", "2", *overrides],
                          capture_output=True, text=True, timeout=120)
    one_line_error(done, "splits model.n_head (1) across 2 processes; it must be divisible by 2")
    assert not (tmp_path / "tp").exists()
    overrides = _overrides(tiny_shards, tmp_path / "tp", "parallel.strategy=tp", "parallel.tp_degree=3")
    done = subprocess.run([sys.executable, "-m", "hybridlm", "train", "--nproc-per-node", "2", *overrides],
                          capture_output=True, text=True, timeout=120)
    one_line_error(done, "parallel.tp_degree (3) must divide the number of processes (2)")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_parallel_follows_one_process_and_its_checkpoint_resumes_on_one(schedule, single, tiny_shards,
                                                                                  tmp_path):
    """One block per stage on two ranks, four micro-batches a step, the tied embedding's two
    gradients summed: the one-process loss curve; the step-5 checkpoint then continues on one process."""
    _ranks_then_one(single, tiny_shards, tmp_path / "pp", "parallel.strategy=pp", f"parallel.pp_schedule={schedule}")


def test_pipeline_with_fsdp_on_a_2d_mesh_follows_one_process(single, tiny_shards, tmp_path):
    """Four processes as a (pp 2, dp 2) mesh: two stages, each on a pair of processes that read
    different rows and shard the model with FSDP2; the one-process losses, and a checkpoint that
    resumes on one."""
    _ranks_then_one(single, tiny_shards, tmp_path / "2d", "parallel.strategy=pp", "parallel.pp_degree=2",
                    "parallel.pp_microbatches=2", ranks=4)


def test_pipeline_stages_must_not_outnumber_the_blocks(tiny_shards, tmp_path):
    overrides = _overrides(tiny_shards, tmp_path / "pp", "parallel.strategy=pp", "model.n_layer=1")
    done = subprocess.run([sys.executable, "-m", "hybridlm", "train", "--nproc-per-node", "2", *overrides],
                          capture_output=True, text=True, timeout=120)
    one_line_error(done, "the model has 1 blocks (model.n_layer); use at most 1")
    assert not (tmp_path / "pp").exists()


MOE = ['model.ffn="moe"', "model.n_experts=4", "model.top_k=2", 'model.moe_balance="bias"', "model.moe_bias_rate=0.01",
       "model.moe_aux_loss=0", "model.capacity_factor=0.75"]
"""Capacity binds (some tokens skip an expert), the balancing biases move with loads summed over
ranks, and the z-loss (a mean over tokens) is on. The balancing loss is left out: each rank computes it
on its own rows (as Switch and Megatron do), so its gradient is not the one-process one."""


def test_moe_under_fsdp_follows_one_process(tiny_shards, tmp_path):
    train(load_run_config(None, _overrides(tiny_shards, tmp_path / "single", *MOE)), progress=False)
    done = _torchrun(2, _overrides(tiny_shards, tmp_path / "fsdp", "parallel.strategy=fsdp", *MOE))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("moe_dropped", {}).get("1", 0) > 0 for r in records)
    from safetensors.torch import load_file

    biases = [load_file(tmp_path / name / "model.safetensors")["blocks.1.ffn.balance_bias"] for name in ("single", "fsdp")]
    assert biases[0].abs().sum() > 0 and (biases[0] - biases[1]).abs().max() < 1e-6


def test_two_processes_weight_reply_tokens_like_one_process(tiny_shards, tmp_path):
    """Instruction tuning: the two ranks score different numbers of reply tokens each step, and the
    loss and update are still the one-process mean over all of them."""
    alpaca = shared_file("instruct/codealpaca/code_alpaca_2k.json")
    sft = TINY_MODEL + [
        "train.objective=sft", f'data.mixture={{"{alpaca}" = 1.0}}', f"data.tokenizer={tiny_shards.parent}/tokenizer.json",
        "train.steps=4", "data.batch_size=4", "data.seq_len=96", "train.log_every=1", "checkpoint.every=4",
        "eval.every=0", "train.dtype=fp32", "schedule.warmup_steps=1", "optim.lr=3e-3"]
    train(load_run_config(None, [*sft, f"train.out={tmp_path / 'single'}"]), progress=False)
    done = _torchrun(2, [*sft, f"train.out={tmp_path / 'ddp'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)


def test_checkpoint_of_two_fsdp_ranks_resumes_on_one(single, tiny_shards, tmp_path):
    run = tmp_path / "run"
    done = _torchrun(2, _overrides(tiny_shards, run, "parallel.strategy=fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    # Make it a run that stopped at step 5, then continue it in a single process.
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS}")
    (run / "model.safetensors").unlink()
    train(load_run_config(None, _overrides(tiny_shards, run)), resume=True, progress=False)
    assert _losses(run) == pytest.approx(single, rel=1e-4)


def test_world_size_that_does_not_divide_the_batch_is_refused(tiny_shards, tmp_path):
    overrides = _overrides(tiny_shards, tmp_path / "run", "data.batch_size=3")
    done = subprocess.run([sys.executable, "-m", "hybridlm", "train", "--nproc-per-node", "2", *overrides],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: data.batch_size (3) is the global micro-batch and must be divisible by the world size (2); "
        "use a multiple of 2"]
    assert not (tmp_path / "run").exists()
    # Under torchrun directly, each rank refuses before training; only rank 0 prints the line.
    under = _torchrun(2, overrides)
    assert under.returncode != 0
    assert under.stderr.count("must be divisible by the world size (2)") == 1
    assert not (tmp_path / "run").exists()
