"""MoE dispatch on CPU: hybridlm's sorted dispatch (assignments sorted by expert, one matmul pair per
expert on a contiguous slice, one index_add back) against a plain loop over experts that picks each
expert's tokens with a boolean mask and scatters its output back.

Both run the same MoEFeedForward weights and routing and combine in the experts' dtype (bf16 under
autocast); forward + backward of one layer on
--tokens tokens (bf16 autocast), median of --repeats after a warm-up. Checks the two agree.

Usage: .venv/bin/python benchmarks/moe_dispatch.py [--d-model 384] [--experts 8] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json

import torch

from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.model.moe import MoEFeedForward
from hybridlm.timing import median_seconds


def masked_loop(layer: MoEFeedForward, x_BTC: torch.Tensor) -> torch.Tensor:
    """The peer: for each expert, the tokens routed to it (and within capacity) by a boolean mask."""
    B, T, C = x_BTC.shape
    x_NC = x_BTC.reshape(B * T, C)
    chosen, gates, _, _ = layer.route(x_NC)
    kept = layer.kept_assignments(chosen.view(B, T, layer.top_k), True).view(B * T, layer.top_k)
    y_NC = None
    for e, expert in enumerate(layer.experts):
        mask = (chosen == e) & kept
        tokens, slots = mask.nonzero(as_tuple=True)
        out = expert(x_NC[tokens])
        y_NC = torch.zeros(B * T, C, dtype=out.dtype) if y_NC is None else y_NC
        y_NC = y_NC.index_add(0, tokens, out * gates[tokens, slots, None].to(out.dtype))
    return y_NC.view(B, T, C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = []
    for top_k in (1, 2):
        cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=6, d_model=args.d_model, layer_pattern="D", ffn="moe",
                          n_experts=args.experts, top_k=top_k, capacity_factor=1.25)
        torch.manual_seed(0)
        layer = HybridLM(cfg).blocks[0].ffn.train()
        x = torch.randn(args.tokens // 1024, 1024, args.d_model, requires_grad=True)

        def step(forward):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward(x)
            out.float().sum().backward()
            layer._losses.clear()
            return out

        with torch.autocast("cpu", dtype=torch.bfloat16):
            difference = float((layer(x).float() - masked_loop(layer, x)).abs().max())
        sorted_s = median_seconds(lambda: step(layer), args.repeats)
        loop_s = median_seconds(lambda: step(lambda t: masked_loop(layer, t)), args.repeats)
        results.append({"top_k": top_k, "sorted_s": sorted_s, "masked_loop_s": loop_s,
                        "speedup": loop_s / sorted_s, "max_abs_difference": difference})
        print(f"top_k={top_k}: sorted {sorted_s * 1e3:.1f} ms, masked loop {loop_s * 1e3:.1f} ms "
              f"({loop_s / sorted_s:.2f}x), outputs differ by {difference:.2e}")
    print(json.dumps({"d_model": args.d_model, "experts": args.experts, "tokens": args.tokens,
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
