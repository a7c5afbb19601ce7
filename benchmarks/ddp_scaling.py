"""Data-parallel scaling on this machine: training tokens/s of 1 process vs 2 torchrun processes.

Each configuration trains the hybrid `small` preset for the same steps on the same global batch
(WikiText-2 shards from wikitext2_data.py) in a fresh subprocess: one plain process (all cores to
PyTorch's intra-op threads), then 2 processes under torchrun with DDP and with FSDP2 (torchrun gives
each process OMP_NUM_THREADS = cores / 2). Tokens/s is taken from the run's last metrics record
(training time only, the first `--skip` steps excluded as warm-up). Each configuration runs
`--repeats` times; the median is reported with the ratio to one process.

Usage: .venv/bin/python benchmarks/ddp_scaling.py --out DIR [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from wikitext2_data import prepared_wikitext2

from hybridlm.train.metrics import read_metrics

CONFIGS = {"1 process": (1, "ddp"), "2 processes, DDP": (2, "ddp"), "2 processes, FSDP2": (2, "fsdp")}


def tokens_per_second(run_dir: Path, skip: int) -> float:
    """Training tokens/s between step `skip` and the last step (evaluation time excluded)."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train_s" in r]
    first = next(r for r in steps if r["step"] == skip)
    return (steps[-1]["tokens"] - first["tokens"]) / (steps[-1]["train_s"] - first["train_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    data = prepared_wikitext2(args.out)
    cores = os.cpu_count() or 1
    overrides = ['model.preset="small"', f"data.path={data}", f"train.steps={args.steps}", "train.log_every=1",
                 f"data.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}", "eval.every=0",
                 "eval.tokens=1024", f"checkpoint.every={args.steps}"]
    results = {}
    for name, (nproc, parallel) in CONFIGS.items():
        rates = []
        for repeat in range(args.repeats):
            run_dir = args.out / f"{nproc}-{parallel}-{repeat}"
            shutil.rmtree(run_dir, ignore_errors=True)
            launch = ([sys.executable, "-m", "hybridlm", "train"] if nproc == 1 else
                      [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                       "-m", "hybridlm", "train"])
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
            subprocess.run(launch + overrides + [f"train.out={run_dir}", f"parallel.strategy={parallel}"],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rates.append(tokens_per_second(run_dir, args.skip))
        results[name] = {"tokens_per_s": rates, "median": statistics.median(rates)}
    base = results["1 process"]["median"]
    for row in results.values():
        row["vs_1_process"] = row["median"] / base
    print(json.dumps({"cores": cores, "global_batch": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
