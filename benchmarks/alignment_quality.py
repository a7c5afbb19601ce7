"""Reward model and DPO on a preference source, from one SFT base: held-out figures and the win
rate of the DPO policy over its SFT parent, judged by the reward model.

Trains (1) a reward model and (2) a DPO policy from --base on the source's training pairs (the
held-out split is data/preferences.py's: pair i with i % 5 == 4), then reports:
- reward model: pairwise accuracy on the held-out pairs, with its standard error sqrt(p(1-p)/n);
- DPO: implicit-reward accuracy on the held-out pairs;
- win rate: both policies reply greedily to the prompts of the first --prompts held-out pairs; the
  reward model scores each reply; DPO wins when its reply scores higher (ties count half); the
  standard error is sqrt(w(1-w)/n); and the mean reply length (tokens) of each policy.

Usage: .venv/bin/python benchmarks/alignment_quality.py --base RUN --pairs SOURCE --out DIR
       [--rm-steps 400] [--dpo-steps 200] [--dpo-lr 2e-5] [--seq-len 256] [--prompts 200] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from hybridlm.data.instructions import held_out_split
from hybridlm.data.pair_rows import encode_pairs
from hybridlm.data.preferences import PAIRS_HELD_OUT_PERIOD, read_preferences
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.run import load_run, load_run_on_device
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.objectives.rm import reply_rewards
from hybridlm.train.trainer import train


def _train(name: str, objective: str, args, steps: int, lr: float, **sections) -> dict:
    run_dir = args.out / name
    if (run_dir / "model.safetensors").exists():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = run_config_from_dict({
        "model": json.loads((args.base / "config.json").read_text())["model"],
        "train": {"out": str(run_dir), "objective": objective, "steps": steps, "init_from": str(args.base),
                  "log_every": 10},
        "data": {"mixture": {args.pairs: 1.0}, "seq_len": args.seq_len, "batch_size": 8, "unshared_pairs": "skip"},
        "optim": {"lr": lr}, "schedule": {"warmup_steps": 10}, "eval": {"every": max(steps // 4, 1)},
        "checkpoint": {"every": steps}, **sections})
    summary = train(cfg, progress=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _replies(run_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    run, _ = load_run_on_device(run_dir)  # bf16 where the CPU has it: decoding's fast path
    end = run.tokenizer.special_ids["end"]
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    found = []
    for prompt in prompts:
        ids = list(generate_ids(run.model, prompt, greedy, eos_id=end))
        found.append(ids if ids and ids[-1] == end else ids + [end])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="The SFT run both stages start from.")
    parser.add_argument("--pairs", required=True, help="A preference file or stdlib-docs:prefs.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rm-steps", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--dpo-lr", type=float, default=2e-5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rm = _train("rm", "rm", args, args.rm_steps, 1e-4)
    dpo = _train("dpo", "dpo", args, args.dpo_steps, args.dpo_lr,
                 dpo={"beta": 0.1, "reference_cache": str(args.out / "reference-logps")})

    base = load_run(args.base)
    held, _ = held_out_split(read_preferences(args.pairs, "skip").pairs, PAIRS_HELD_OUT_PERIOD)
    prompts = [e.prompt[-(args.seq_len - args.max_new_tokens - 1):]
               for e in encode_pairs(base.tokenizer, held[: args.prompts])]
    started = time.perf_counter()
    sft_replies = _replies(args.base, prompts, args.max_new_tokens)
    dpo_replies = _replies(args.out / "dpo", prompts, args.max_new_tokens)
    judge = load_run(args.out / "rm")
    pad = base.tokenizer.special_ids["pad"]
    r_sft = reply_rewards(judge.model, prompts, sft_replies, args.seq_len, pad, "fp32")
    r_dpo = reply_rewards(judge.model, prompts, dpo_replies, args.seq_len, pad, "fp32")
    wins = float(((r_dpo > r_sft).double() + 0.5 * (r_dpo == r_sft).double()).mean())
    n_rm, n = rm["val_by_source"][args.pairs]["pairs"], len(prompts)
    result = {
        "pairs": args.pairs, "base": str(args.base), "held_out_pairs": n_rm,
        "rm_accuracy": rm["val_accuracy"], "rm_accuracy_se": math.sqrt(rm["val_accuracy"] * (1 - rm["val_accuracy"]) / n_rm),
        "rm_steps": args.rm_steps, "rm_seconds": rm["seconds"],
        "dpo_accuracy": dpo["val_rewards/accuracies"], "dpo_margin": dpo["val_rewards/margins"],
        "dpo_steps": args.dpo_steps, "dpo_seconds": dpo["seconds"],
        "win_rate_dpo_over_sft": wins, "win_rate_se": math.sqrt(wins * (1 - wins) / n), "win_prompts": n,
        "mean_reply_tokens_sft": sum(map(len, sft_replies)) / n, "mean_reply_tokens_dpo": sum(map(len, dpo_replies)) / n,
        "mean_reward_sft": float(r_sft.mean()), "mean_reward_dpo": float(r_dpo.mean()),
        "generation_and_scoring_s": time.perf_counter() - started,
    }
    (args.out / "alignment.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
