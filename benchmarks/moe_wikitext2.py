"""Mixture of experts against dense models on WikiText-2, at equal tokens and equal wall-clock.

Three models with the same attention, width and depth, trained on the same data order:
- moe: 8 SwiGLU experts of width d_ff per layer, top-1 routing (Switch), capacity 1.25 / 2.0;
- dense-flops: one SwiGLU FFN of width d_ff (the MoE's active parameters: same FLOPs per token);
- dense-params: one SwiGLU FFN of width 8 * d_ff (the MoE's total parameters).
Reports validation bits per byte (WikiText-2 valid.txt, sliding window) after the same tokens, the
validation curve against tokens and seconds, training tokens/s, and the compute the MoE model needed
to reach the FLOP-matched dense model's final validation loss (FLOPs per token from model_info x
tokens), as a share of what the dense model spent: the measured counterpart of Switch's "up to 64%
less compute". Writes OUT/moe_wikitext2.json and OUT/moe_wikitext2.png.

Usage: .venv/bin/python benchmarks/moe_wikitext2.py --out DIR [--steps 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wikitext2_data import DATA, prepared_wikitext2

from hybridlm.eval.perplexity import evaluate_path
from hybridlm.model.info import model_info
from hybridlm.run import load_run
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.trainer import train

BASE = {"preset": "small", "n_layer": 4, "d_model": 256, "n_head": 4, "d_ff": 704, "max_seq_len": 256,
        "layer_pattern": "DSSS", "window": 64, "stride": 64, "n_global": 4}
MODELS = {
    "moe": {**BASE, "ffn": "moe", "n_experts": 8, "top_k": 1},
    "dense-flops": BASE,
    "dense-params": {**BASE, "d_ff": 8 * 704},
}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[dict]:
    """(tokens, seconds, validation loss and bpb) at each evaluation."""
    records = _records(run_dir)
    steps = {r["step"]: r for r in records if "tokens" in r}
    return [{"tokens": steps[r["step"]]["tokens"], "train_s": steps[r["step"]]["train_s"], "val_loss": r["val_loss"],
             "val_bpb": r["val_bpb"]} for r in records if "val_loss" in r]


def compute_to_reach(points: list[dict], target: float, flops_per_token: float) -> float | None:
    """FLOPs spent when the validation loss first reached `target` (linear between evaluations)."""
    previous = None
    for point in points:
        if point["val_loss"] <= target:
            if previous is None:
                return point["tokens"] * flops_per_token
            share = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return (previous["tokens"] + share * (point["tokens"] - previous["tokens"])) * flops_per_token
        previous = point
    return None


def _plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    by_tokens, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, result in results["models"].items():
        points = result["curve"]
        by_tokens.plot([p["tokens"] for p in points], [p["val_bpb"] for p in points], marker="o", label=name)
        by_time.plot([p["train_s"] for p in points], [p["val_bpb"] for p in points], marker="o", label=name)
    by_tokens.set(xlabel="training tokens", ylabel="validation bits per byte", title="equal tokens")
    by_time.set(xlabel="training seconds", ylabel="validation bits per byte", title="equal wall-clock")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    data = prepared_wikitext2(args.out)
    results = {"steps": args.steps, "models": {}}
    for name, model in MODELS.items():
        run_dir = args.out / name
        if not (run_dir / "model.safetensors").exists():
            train(run_config_from_dict({
                "model": model, "train": {"out": str(run_dir), "steps": args.steps, "log_every": 5},
                "data": {"path": str(data), "batch_size": 16, "seq_len": 256}, "optim": {"lr": 2e-3},
                "schedule": {"warmup_steps": 20}, "eval": {"every": 25, "tokens": 32768},
                "checkpoint": {"every": args.steps}}), progress=False)
        run = load_run(run_dir)
        info = model_info(run.model.cfg, 256)
        train_records = [r for r in _records(run_dir) if "tok_s" in r]
        results["models"][name] = {
            "params": info["params"], "params_active": info["params_active"], "flops_per_token": info["flops_per_token"],
            "tokens_per_s": train_records[-1]["tok_s"], "train_s": train_records[-1]["train_s"],
            "valid_bpb": evaluate_path(run, DATA / "valid.txt", None)["bpb"], "curve": curve(run_dir)}
    moe, dense = results["models"]["moe"], results["models"]["dense-flops"]
    target = dense["curve"][-1]["val_loss"]
    spent = compute_to_reach(moe["curve"], target, moe["flops_per_token"])
    dense_spent = dense["curve"][-1]["tokens"] * dense["flops_per_token"]
    results["moe_compute_to_dense_final_loss"] = {"target_val_loss": target, "moe_flops": spent,
                                                  "dense_flops": dense_spent,
                                                  "share": spent / dense_spent if spent else None}
    (args.out / "moe_wikitext2.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "moe_wikitext2.png")
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=2))
    for name, r in results["models"].items():
        print(f"{name}: {r['params']:,} params ({r['params_active']:,} active), {r['tokens_per_s']:,.0f} tokens/s, "
              f"valid bpb {r['valid_bpb']:.4f}")


if __name__ == "__main__":
    main()
