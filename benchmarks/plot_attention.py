"""Plot `hybridlm bench attention --json` output: time vs sequence length, dense vs sparse.

Usage: .venv/bin/hybridlm bench attention --json > attn.json
       .venv/bin/python benchmarks/plot_attention.py attn.json docs/attention_time.png
Needs the [bench] extra (matplotlib).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = json.loads(open(src).read())["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype in sorted({r["dtype"] for r in rows}):
        for pass_ in sorted({r["pass"] for r in rows}):
            pts = sorted((r["seq"], r["dense_s"], r["sparse_s"]) for r in rows if r["dtype"] == dtype and r["pass"] == pass_)
            if not pts:
                continue
            seq = [p[0] for p in pts]
            line = ax.plot(seq, [p[1] for p in pts], "--o", label=f"dense SDPA {dtype} {pass_}")[0]
            ax.plot(seq, [p[2] for p in pts], "-o", color=line.get_color(), label=f"hybridlm sparse {dtype} {pass_}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("seconds (median)")
    ax.set_title("One attention layer: 8 heads x 64, window = stride = 128, 8 global slots")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
