"""Progressive training on WikiText-2: does a sequence-length warmup or a batch-size ramp reach a
validation loss in fewer tokens or less time than the plain schedule?

Trains the hybrid `small` preset three times on the same token budget (steps follow from it) with
the same lr schedule shape: plain (batch 4 x 1024 from the start), seq-warmup (sequences grow from
128 to 1024 over the first 100 steps), batch-ramp (rows grow from 1 to 4 over the first 60 steps).
Validation bits per byte on held-out training-set documents every 10 steps. For targets taken from
the plain run's curve (its value at 50%, 75% and 100% of the budget) it reports the tokens and the
training seconds (evaluations excluded) each schedule needed to first reach it, and draws the
curves against tokens and against time.

Usage: .venv/bin/python benchmarks/progressive_wikitext2.py --out DIR [--tokens 819200] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wikitext2_data import prepared_wikitext2

from hybridlm.train.config import run_config_from_dict
from hybridlm.train.metrics import read_metrics
from hybridlm.train.schedule import batch_schedule
from hybridlm.train.trainer import train

SCHEDULES = {
    "plain": {},
    "seq-warmup": {"seq_len_start": 128, "seq_len_warmup_steps": 100},
    "batch-ramp": {"batch_size_start": 1, "batch_ramp_steps": 60},
}


def curve(run_dir: Path) -> list[dict]:
    """(tokens, training seconds, val bpb) at each evaluation."""
    records = read_metrics(run_dir / "metrics.jsonl")
    by_step = {r["step"]: r for r in records if "loss" in r}
    return [{"step": r["step"], "tokens": by_step[r["step"]]["tokens"], "train_s": by_step[r["step"]]["train_s"],
             "val_bpb": r["val_bpb"]} for r in records if "val_bpb" in r]


def first_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["val_bpb"] <= target), None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, run in results.items():
        points = run["curve"]
        by_tokens.plot([p["tokens"] / 1e3 for p in points], [p["val_bpb"] for p in points], "-o", ms=2, label=name)
        by_time.plot([p["train_s"] for p in points], [p["val_bpb"] for p in points], "-o", ms=2, label=name)
    by_tokens.set_xlabel("training tokens (thousands)")
    by_time.set_xlabel("training seconds (evaluations excluded)")
    by_tokens.set_ylabel("validation bits per byte")
    for ax in (by_tokens, by_time):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.legend()
    fig.suptitle("Progressive training, hybrid `small` on WikiText-2 (same token budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=819_200)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    data = prepared_wikitext2(args.out)
    results = {}
    for name, extra in SCHEDULES.items():
        run_dir = args.out / name
        doc = {"model": {"preset": "small"}, "train": {"out": str(run_dir), "log_every": 1},
               "data": {"path": str(data), "batch_size": 4, "seq_len": 1024}, "optim": {"lr": 1e-3},
               "schedule": {"warmup_steps": 20}, "eval": {"every": 10, "tokens": 8192}, "progressive": extra}
        steps = batch_schedule(run_config_from_dict(doc)).steps_for_tokens(args.tokens)
        doc["train"]["steps"], doc["checkpoint"] = steps, {"every": steps}
        if not (run_dir / "model.safetensors").exists():
            train(run_config_from_dict(doc), progress=False)
        results[name] = {"steps": steps, "curve": curve(run_dir)}
    plain = results["plain"]["curve"]
    targets = [plain[len(plain) // 2 - 1]["val_bpb"], plain[3 * len(plain) // 4 - 1]["val_bpb"], plain[-1]["val_bpb"]]
    reach = {name: [first_reaching(run["curve"], t) for t in targets] for name, run in results.items()}
    summary = {"targets_bpb": targets, "reach": {
        name: [None if p is None else {"tokens": p["tokens"], "train_s": p["train_s"],
                                       "tokens_vs_plain": p["tokens"] / base["tokens"],
                                       "time_vs_plain": p["train_s"] / base["train_s"]}
               for p, base in zip(points, reach["plain"])] for name, points in reach.items()},
        "final_bpb": {name: run["curve"][-1]["val_bpb"] for name, run in results.items()},
        "total_train_s": {name: run["curve"][-1]["train_s"] for name, run in results.items()},
        "steps": {name: run["steps"] for name, run in results.items()}}
    if args.plot:
        plot(results, args.plot)
    print(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
