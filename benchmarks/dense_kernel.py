"""Dense causal attention on hybridlm's C++ kernel (window >= n) vs PyTorch SDPA, forward + backward.

Usage: .venv/bin/python benchmarks/dense_kernel.py [--seq 1024,4096,16384]
One layer, batch 1, 8 heads x 64, bf16; medians of 3 warm runs. Also prints the kernel's matmul
rate in each pass: causal attention does 2 n^2 D FLOPs per head forward (QK^T and PV over half the
square) and 2.5 times that backward (the recomputed QK^T plus four products).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hybridlm.model.sparse_kernel_bf16 import SparseAttentionBF16, kernel_applies
from hybridlm.timing import median_seconds

HEADS, DIM = 8, 64


def fwd_seconds(attend, n: int, repeats: int = 3) -> float:
    q, k, v = (torch.randn(1, HEADS, n, DIM, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        return median_seconds(lambda: attend(q, k, v), repeats)


def fwd_bwd_seconds(attend, n: int, repeats: int = 3) -> float:
    q, k, v = (torch.randn(1, HEADS, n, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

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
    print("| n | SDPA fwd+bwd (s) | hybridlm kernel fwd+bwd (s) | speedup | kernel fwd GFLOP/s | kernel bwd GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.seq.split(",")):
        def ours(q, k, v):
            return SparseAttentionBF16.apply(q, k, v, None, None, n, n + 1, 64)

        sdpa = fwd_bwd_seconds(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), n)
        both, fwd = fwd_bwd_seconds(ours, n), fwd_seconds(ours, n)
        fwd_flops = 2 * n * n * DIM * HEADS
        print(f"| {n:,} | {sdpa:.4f} | {both:.4f} | {sdpa / both:.2f}x | {fwd_flops / fwd / 1e9:.0f} | "
              f"{2.5 * fwd_flops / (both - fwd) / 1e9:.0f} |")


if __name__ == "__main__":
    main()
