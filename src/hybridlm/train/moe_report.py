"""`hybridlm report`'s mixture-of-experts plot: per MoE layer, each expert's share of the routed
tokens over training, and the dropped share and router entropy, from metrics.jsonl's moe_* fields."""

from __future__ import annotations

import math

from hybridlm.report_format import figure_png, series_colour
from hybridlm.train.metrics import StageMetrics
from hybridlm.train.report import token_offsets


def plot_moe(stages: list[StageMetrics]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [(offset + r.get("tokens", 0), r) for stage, offset in zip(stages, token_offsets(stages))
               for r in stage.train if "moe_load" in r]
    layers = sorted({layer for _, r in records for layer in r["moe_load"]}, key=int)
    rows = max(1, len(layers) + 1)
    fig = Figure(figsize=(10, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    if not records:
        fig.text(0.5, 0.5, "no mixture-of-experts layers in this run", ha="center")
        return figure_png(fig)
    grid = fig.add_gridspec(rows, 2)
    marker = "o" if len(records) < 20 else None
    for n, layer in enumerate(layers):
        ax = fig.add_subplot(grid[n, :])
        points = [(x, r["moe_load"][layer]) for x, r in records if layer in r["moe_load"]]
        experts = len(points[0][1])
        for e in range(experts):
            ax.plot([x for x, _ in points], [load[e] for _, load in points], color=series_colour(e), marker=marker,
                    label=f"expert {e}")
        ax.axhline(1 / experts, color="black", linestyle=":", linewidth=1, label="even")
        ax.set(title=f"layer {layer}: share of routed tokens", xlabel="tokens (cumulative)", ylabel="share")
        ax.legend(fontsize="x-small", ncol=min(experts + 1, 5))
    dropped, entropy = fig.add_subplot(grid[-1, 0]), fig.add_subplot(grid[-1, 1])
    for i, layer in enumerate(layers):
        xs = [x for x, r in records if layer in r["moe_dropped"]]
        dropped.plot(xs, [r["moe_dropped"][layer] for _, r in records if layer in r["moe_dropped"]],
                     color=series_colour(i), marker=marker, label=f"layer {layer}")
        entropy.plot(xs, [r["moe_router_entropy"][layer] for _, r in records if layer in r["moe_router_entropy"]],
                     color=series_colour(i), marker=marker, label=f"layer {layer}")
    experts = len(records[0][1]["moe_load"][layers[0]])
    entropy.axhline(math.log(experts), color="black", linestyle=":", linewidth=1, label="uniform")
    dropped.set(title="dropped share of assignments", xlabel="tokens (cumulative)")
    entropy.set(title="router entropy (nats)", xlabel="tokens (cumulative)")
    for ax in (dropped, entropy):
        ax.legend(fontsize="x-small")
    return figure_png(fig)
