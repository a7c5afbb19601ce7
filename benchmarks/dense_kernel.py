"""Dense causal attention on hybridlm's C++ kernel (window >= n) vs PyTorch SDPA, forward + backward.

Usage: .venv/bin/python benchmarks/dense_kernel.py [--seq 1024,4096,16384]
One layer, batch 1, 8 heads x 64, bf16; medians of 3 warm runs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hybridlm.bench.timing import median_seconds
from hybridlm.model.sparse_kernel_bf16 import SparseAttentionBF16, kernel_applies


def fwd_bwd_seconds(attend, n: int, repeats: int = 3) -> float:
    q, k, v = (torch.randn(1, 8, n, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def run() -> None:
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))

    return median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1024,4096,16384")
    args = parser.parse_args()
    if not kernel_applies(torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)):
        raise SystemExit("the C++ kernel is not available here (needs avx512_bf16 and a C++ compiler)")
    print("| n | SDPA (s) | hybridlm kernel (s) | speedup |\n|---|---|---|---|")
    for n in (int(x) for x in args.seq.split(",")):
        sdpa = fwd_bwd_seconds(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), n)
        ours = fwd_bwd_seconds(lambda q, k, v: SparseAttentionBF16.apply(q, k, v, None, None, n, n + 1, 64), n)
        print(f"| {n:,} | {sdpa:.4f} | {ours:.4f} | {sdpa / ours:.2f}x |")


if __name__ == "__main__":
    main()
