"""Attention time against sequence length n, log-log slopes: dense causal SDPA vs hybridlm sparse
with a fixed window and stride, and with w = s = sqrt(n) (the schedule that makes the cost
n * (w + n/s) = 2 n sqrt(n), the method's O(n sqrt(n) d)).

One layer, batch 1, 8 heads x 64, 8 global slots, bf16 forward (the C++ kernel where it applies),
median of `repeats` warm runs per point, all in this process. Slopes are least-squares fits of
log time on log n over the lengths given (2 = quadratic, 1.5 = n sqrt(n), 1 = linear).

Usage: .venv/bin/python benchmarks/attention_scaling.py [--seq 1024,2048,4096,8192,16384] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.model.attention import sparse_causal_attention
from hybridlm.timing import median_seconds

HEADS, HEAD_DIM, N_GLOBAL, FIXED = 8, 64, 8, 128


def forward_seconds(n: int, kind: str, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).bfloat16() for _ in range(3))
    kg, vg = (torch.randn(1, HEADS, N_GLOBAL, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    side = FIXED if kind == "sparse_fixed" else math.isqrt(n)

    def run() -> None:
        with torch.no_grad():
            if kind == "dense":
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                sparse_causal_attention(q, k, v, window=side, stride=side, k_extra_BHED=kg, v_extra_BHED=vg)

    return median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lengths = [int(n) for n in args.seq.split(",")]
    kinds = ("dense", "sparse_fixed", "sparse_sqrt")
    times = {kind: [forward_seconds(n, kind, args.repeats) for n in lengths] for kind in kinds}
    slopes = {kind: float(np.polyfit(np.log(lengths), np.log(t), 1)[0]) for kind, t in times.items()}
    if args.json:
        print(json.dumps({"seq": lengths, "seconds": times, "slopes": slopes}, indent=2))
        return
    print("| n | dense SDPA (s) | sparse w = s = 128 (s) | sparse w = s = sqrt(n) (s) |")
    print("|---|---|---|---|")
    for i, n in enumerate(lengths):
        print(f"| {n:,} | " + " | ".join(f"{times[k][i]:.4f}" for k in kinds) + " |")
    print("| log-log slope | " + " | ".join(f"{slopes[k]:.2f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
