"""Quality of hybrid vs all-dense `small` on WikiText-2: same tokens, and same wall-clock.

Trains a byte-level BPE (8192) on WikiText-2 train, prepares it, then trains the `small` preset
twice at T=1024 with identical data order and settings: once hybrid (DDSSSS), once all-dense
(both on the same kernels). Reports bits per byte on the WikiText-2 validation file (sliding
window, each token scored once) after the same number of tokens, and, from the training curves,
validation bits per byte at the wall-clock time the hybrid run finished.

Usage: .venv/bin/python benchmarks/quality_wikitext2.py --out runs/quality [--steps 200] [--all-sparse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wikitext2_data import DATA, prepared_wikitext2

from hybridlm.eval.perplexity import evaluate_path
from hybridlm.run import load_run
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.trainer import train


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, validation bpb) at each evaluation, elapsed taken from the nearest step record."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
    return [(elapsed[r["step"]], r["val_bpb"]) for r in records if "val_bpb" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--all-sparse", action="store_true", help="Also train the all-sparse ablation (SSSSSS).")
    args = parser.parse_args()
    out = args.out
    data = prepared_wikitext2(out)
    results = {}
    patterns = [("hybrid", "DDSSSS"), ("dense", "DDDDDD")] + ([("sparse", "SSSSSS")] if args.all_sparse else [])
    for name, pattern in patterns:
        run_dir = out / name
        if not (run_dir / "model.safetensors").exists():
            cfg = run_config_from_dict({
                "model": {"preset": "small", "layer_pattern": pattern},
                "train": {"out": str(run_dir), "steps": args.steps, "log_every": 5},
                "data": {"path": str(data), "batch_size": 4, "seq_len": 1024}, "optim": {"lr": 1e-3},
                "schedule": {"warmup_steps": 20}, "eval": {"every": 25, "tokens": 16384},
                "checkpoint": {"every": args.steps},
            })
            train(cfg, progress=False)
        final = evaluate_path(load_run(run_dir), DATA / "valid.txt", None)
        results[name] = {"valid_bpb": final["bpb"], "valid_tokens": final["tokens"], "curve": curve(run_dir)}
    budget = results["hybrid"]["curve"][-1][0]
    dense_at_budget = [bpb for t, bpb in results["dense"]["curve"] if t <= budget]
    results["same_wall_clock"] = {"seconds": budget, "hybrid_val_bpb": results["hybrid"]["curve"][-1][1],
                                  "dense_val_bpb": dense_at_budget[-1] if dense_at_budget else None}
    results["same_tokens_ratio"] = results["hybrid"]["valid_bpb"] / results["dense"]["valid_bpb"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
