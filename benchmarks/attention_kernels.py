"""The two C++ attention kernels head to head: the AMX path's (oneDNN brgemm) and our AVX-512 BF16 one.

Usage: .venv/bin/python benchmarks/attention_kernels.py [--seq 1024,4096,16384]
One layer, batch 1, 8 heads x 64, bf16, as the `small` model's layers call them: sparse (window
256, stride sqrt(n), 8 global slots) and dense causal (window >= n). Forward and forward+backward,
medians of 3 warm runs, with each kernel's time and the ratio. On a CPU without AMX the brgemm
kernel runs on oneDNN's AVX-512 BF16 code; `auto` only takes it where the CPU has AMX.
"""

from __future__ import annotations

import argparse
import math

import torch

from hybridlm.model.cpu_kernels import machine
from hybridlm.model.sparse_kernel_bf16 import SparseAttentionBF16, avx512_extension, brgemm_extension
from hybridlm.timing import median_seconds

HEADS, DIM, GLOBAL, WINDOW = 8, 64, 8, 256


def seconds(kernel, n: int, window: int, stride: int, n_global: int, backward: bool) -> float:
    q, k, v = (torch.randn(1, HEADS, n, DIM, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    kg, vg = ((torch.randn(1, HEADS, n_global, DIM, dtype=torch.bfloat16, requires_grad=backward) for _ in range(2))
              if n_global else (None, None))

    def run() -> None:
        out = SparseAttentionBF16.apply(q, k, v, kg, vg, window, stride, 64, kernel)
        if backward:
            out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(backward):
        return median_seconds(run, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1024,4096,16384")
    args = parser.parse_args()
    brgemm, ours = brgemm_extension(("amx", "avx512_bf16")), avx512_extension()
    if brgemm is None or ours is None:
        raise SystemExit("the C++ kernels are not available here (they need avx512_bf16 and a C++ compiler)")
    ran_on = machine()
    print(f"{ran_on['cpu']} ({ran_on['cpu_flags']}); auto kernel path: {ran_on['kernel_path']}\n")
    print("| layer | n | pass | brgemm (s) | avx512_bf16 (s) | brgemm speedup |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.seq.split(",")):
        layers = {"sparse": (WINDOW, max(1, math.isqrt(n)), GLOBAL), "dense": (n, n + 1, 0)}
        for layer, (window, stride, n_global) in layers.items():
            for backward in (False, True):
                times = [seconds(kernel, n, window, stride, n_global, backward) for kernel in (brgemm, ours)]
                print(f"| {layer} | {n:,} | {'fwd+bwd' if backward else 'fwd'} | {times[0]:.4f} | {times[1]:.4f} | "
                      f"{times[1] / times[0]:.2f}x |")


if __name__ == "__main__":
    main()
