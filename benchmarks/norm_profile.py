"""Where a training step's time goes, by op class, for LayerNorm vs RMSNorm models of growing width.

The review behind the method claims that layer normalisation's overhead grows with model size.
For each width, one hybrid model (DDSSSS, 6 layers) with `norm = "layernorm"` and one with
`"rmsnorm"`, otherwise identical, run a few warm training steps (forward + backward + AdamW,
bf16 autocast, the machine's kernels) under torch.profiler. Each top-level event (an op called
from Python, an autograd node of the backward, the optimizer step) is put in one class by its
name with its inclusive CPU time (matmul, attention, norm, loss, elementwise, optimizer, other),
reported as shares of the step. A composite norm's backward nodes (pow, mean, mul) cannot be told
from other elementwise work by name, so the norm's cost is also measured directly: the same
model with every norm replaced by the identity, wall time per step (median of `steps`), and the
overhead = 1 - t(identity) / t(norm).

Usage: .venv/bin/python benchmarks/norm_profile.py [--widths 256,512,768] [--seq 512] [--batch 4] [--steps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM

VOCAB = 8192
CLASSES = {  # fragments of lower-cased event names, first match wins
    "optimizer": ("optimizer", "adam", "_foreach"),
    "norm": ("layer_norm", "layernorm", "rms_norm", "rmsnorm"),
    "attention": ("sparse", "attention", "flash"),
    "loss": ("cross_entropy", "crossentropy", "log_softmax", "logsoftmax"),
    "matmul": ("mm", "linear", "matmul"),
    "elementwise": ("add", "mul", "silu", "gelu", "sub", "div", "neg", "cat", "copy", "exp", "pow", "mean", "sum",
                    "where", "fill", "clone", "slice", "view", "transpose", "expand", "index", "cos", "sin", "stack",
                    "_to_copy", "aten::to", "split", "reshape", "unsqueeze", "chunk", "t_backward", "tbackward"),
}


def op_class(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in CLASSES.items():
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def _model(width: int, norm: str, seq: int, identity_norms: bool) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=6, n_head=max(1, width // 64), d_model=width, max_seq_len=seq,
                      layer_pattern="DDSSSS", window=128, stride=128, n_global=8, norm=norm)
    model = HybridLM(cfg)
    if identity_norms:
        for block in model.blocks:
            block.norm1, block.norm2 = torch.nn.Identity(), torch.nn.Identity()
        model.norm_f = torch.nn.Identity()
    return model


def _stepper(model: HybridLM, seq: int, batch: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets_BT=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (kernel build, allocator)
    return step


def step_seconds(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_step(width: int, norm: str, seq: int, batch: int, steps: int = 3) -> dict:
    model = _model(width, norm, seq, identity_norms=False)
    step = _stepper(model, seq, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_class: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is None:
            by_class[op_class(event.name)] += event.cpu_time_total
    total = sum(by_class.values())
    with_norm = step_seconds(step, steps)
    without = step_seconds(_stepper(_model(width, norm, seq, identity_norms=True), seq, batch), steps)
    return {"width": width, "norm": norm, "params": sum(p.numel() for p in model.parameters()), "step_s": with_norm,
            "step_s_identity_norms": without, "norm_overhead": 1 - without / with_norm,
            "shares": {k: v / total for k, v in sorted(by_class.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="256,512,768")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [profile_step(int(w), norm, args.seq, args.batch, args.steps) for w in args.widths.split(",")
            for norm in ("layernorm", "rmsnorm")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    kinds = ("matmul", "attention", "norm", "loss", "elementwise", "optimizer", "other")
    print("| width | norm | params | step (s) | identity norms (s) | norm overhead | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(kinds))
    for row in rows:
        shares = " | ".join(f"{row['shares'].get(k, 0.0):.1%}" for k in kinds)
        print(f"| {row['width']} | {row['norm']} | {row['params']:,} | {row['step_s']:.3f} | "
              f"{row['step_s_identity_norms']:.3f} | {row['norm_overhead']:.1%} | {shares} |")


if __name__ == "__main__":
    main()
