"""An rl run's reward curve (PNG) and the throughput of its two phases, from its metrics.jsonl.

Generation: completion tokens sampled / seconds in generation (the steps that sampled a batch).
Update: tokens the policy's forward and backward passes covered (rows x data.seq_len: prompt,
completion and padding) / the rest of the step's seconds (step_s - generation_s), over all steps.
Run the stage first, e.g. `hybridlm train --recipe align --stage rl ...` with log_every = 1.

Usage: .venv/bin/python benchmarks/rl_throughput.py --run RUN_DIR --png docs/rl_reward.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridlm.fileio import atomic_write_bytes, read_json
from hybridlm.report_format import figure_png
from hybridlm.train.metrics import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    config = read_json(args.run / "config.json", "run config")
    rows = config["data"]["batch_size"] * config["rl"]["group_size"] * config["data"]["grad_accum"]
    records = read_metrics(args.run / "metrics.jsonl")
    steps = [r for r in records if "step_s" in r]
    if any(r["step"] - p["step"] != 1 for p, r in zip(steps, steps[1:])):
        raise SystemExit("the run logged every few steps; rerun it with train.log_every=1")
    sampled = [r for r in steps if "generation_s" in r]
    generation_s = sum(r["generation_s"] for r in sampled)
    update_s = sum(r["step_s"] - r.get("generation_s", 0.0) for r in steps)
    result = {
        "run": str(args.run), "steps": len(steps), "rows_per_step": rows, "seq_len": config["data"]["seq_len"],
        "generated_tokens": sum(r["generated_tokens"] for r in sampled), "generation_s": generation_s,
        "generation_tok_s": sum(r["generated_tokens"] for r in sampled) / generation_s,
        "update_s": update_s, "update_tok_s": len(steps) * rows * config["data"]["seq_len"] / update_s,
        "share_of_time_generating": generation_s / (generation_s + update_s),
        "reward_first": sampled[0]["reward_mean"], "reward_last": sampled[-1]["reward_mean"],
        "val_reward": [(r["step"], r["val_reward"]) for r in records if "val_reward" in r],
        "kl_last": steps[-1].get("kl"),
    }

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=f"Online RL (GRPO) reward: {args.run.name}", xlabel="step", ylabel="reward")
    ax.grid(alpha=0.3)
    ax.plot([r["step"] for r in sampled], [r["reward_mean"] for r in sampled], label="sampled (mean of the batch)")
    if result["val_reward"]:
        xs, ys = zip(*result["val_reward"])
        ax.plot(xs, ys, marker="o", linestyle="--", label="held-out prompts, greedy")
    ax.legend()
    atomic_write_bytes(args.png, figure_png(fig))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
