"""torch.compile vs eager for a training step of the `small` preset (what `train.compile=true` does).

Usage: .venv/bin/python benchmarks/compile_train.py [--seq 1024] [--batch 8]
bf16 autocast, forward + backward + AdamW; prints the first (compiling) step's time and the median
tokens/s of 7 further steps for eager and compiled.
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.config import preset
from hybridlm.model import HybridLM
from hybridlm.timing import median_seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HybridLM(preset("small", vocab_size=8192, max_seq_len=max(args.seq, 1024)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 8192, (args.batch, args.seq + 1))

    def step(forward) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(ids[:, :-1], targets_BT=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name, forward in (("eager", model), ("compiled", torch.compile(model))):
        first = seconds(lambda: step(forward))
        median = median_seconds(lambda: step(forward), 7, warmup=0)
        print(f"{name:9s} T={args.seq} batch={args.batch}: first step {first:.1f} s, "
              f"{args.batch * args.seq / median:,.0f} tokens/s")


if __name__ == "__main__":
    main()
