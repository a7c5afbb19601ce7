"""The decode kernels against PyTorch's bf16 kernels on the shapes of a decode step.

1. Linear: a few rows (1, 4, 8) through GPT-2-shaped weights, ours vs F.linear, the weights hot
   in cache (the same matrix again and again).
2. Linear, streamed: one row through ~40 MB of distinct matrices of one shape, so each call reads
   its weights from memory, as a decode step of a model larger than the cache does.
3. Attention: one query per head (6 heads, head dim 64) against S cached keys, ours vs SDPA.

Usage: .venv/bin/python benchmarks/decode_kernels.py [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hybridlm.model.cpu_kernels import machine
from hybridlm.model.decode_kernel_bf16 import decode_attention_bf16, linear_bf16

SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536), (8192, 384), (3072, 768)]


def microseconds(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def hot_linear() -> list[dict]:
    rows = []
    for n_out, n_in in SHAPES:
        for m in (1, 4, 8):
            w, b, x = (torch.randn(n_out, n_in).bfloat16(), torch.randn(n_out).bfloat16(),
                       torch.randn(m, n_in).bfloat16())
            rows.append({"shape": f"{n_out}x{n_in}", "rows": m,
                         "ours_us": microseconds(lambda: linear_bf16(x, w, b)),
                         "torch_us": microseconds(lambda: F.linear(x, w, b))})
    return rows


def streamed_linear(total_bytes: float = 40e6) -> list[dict]:
    rows = []
    for n_out, n_in in SHAPES:
        weights = [torch.randn(n_out, n_in).bfloat16() for _ in range(max(2, int(total_bytes / (n_out * n_in * 2))))]
        x = torch.randn(1, n_in).bfloat16()
        size = sum(w.numel() * 2 for w in weights)
        row = {"shape": f"{n_out}x{n_in}", "mb": size / 1e6}
        for name, fn in (("ours", lambda w: linear_bf16(x, w, None)), ("torch", lambda w: F.linear(x, w))):
            seconds = microseconds(lambda: [fn(w) for w in weights], calls=10) / 1e6
            row[f"{name}_gb_s"] = size / seconds / 1e9
        rows.append(row)
    return rows


def attention() -> list[dict]:
    rows = []
    for length in (512, 2048, 8192):
        q = torch.randn(1, 6, 1, 64).bfloat16()
        k, v = (torch.randn(1, 6, length + 64, 64).bfloat16()[:, :, :length] for _ in range(2))  # cache slices
        rows.append({"keys": length, "ours_us": microseconds(lambda: decode_attention_bf16(q, [k], [v])),
                     "sdpa_us": microseconds(lambda: F.scaled_dot_product_attention(q, k, v))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        result = {"machine": machine(), "threads": args.threads, "linear": hot_linear(),
                  "linear_streamed": streamed_linear(), "attention": attention()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']}, {args.threads} threads")
    for r in result["linear"]:
        print(f"linear {r['shape']:>9} x {r['rows']} rows: ours {r['ours_us']:7.1f} us  torch {r['torch_us']:7.1f} us")
    for r in result["linear_streamed"]:
        print(f"streamed {r['shape']:>9} ({r['mb']:.0f} MB): ours {r['ours_gb_s']:5.1f} GB/s  "
              f"torch {r['torch_gb_s']:5.1f} GB/s")
    for r in result["attention"]:
        print(f"attention {r['keys']:>5} keys: ours {r['ours_us']:7.1f} us  sdpa {r['sdpa_us']:7.1f} us")


if __name__ == "__main__":
    main()
