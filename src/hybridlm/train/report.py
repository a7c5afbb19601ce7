"""`hybridlm report`: PNG plots and a markdown summary of a training run or of a recipe's stages.

Everything is read from what training already writes (metrics.jsonl, config.json and whether
model.safetensors exists), so a report can be drawn while a recipe is still running or after it
was killed. Plots use matplotlib's Agg canvas directly: no display, no pyplot global state."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes, atomic_write_text
from hybridlm.report_format import (
    escape_cell,
    figure_png,
    format_figure,
    json_safe,
    series_colour,
)
from hybridlm.train.metrics import (
    StageMetrics,
    is_number,
    load_stages,
    stage_seconds,
    tokens_at,
)

PLOTS = {"loss": "loss.png", "lr": "lr.png", "tokens_by_source": "tokens_by_source.png",
         "objective": "objective_figures.png", "moe": "moe.png"}
COUNTS = ("val_loss", "val_tokens", "val_bytes", "val_pairs", "val_prompts", "val_ppl")
"""Validation keys the objective-figures plot leaves out (the loss has its own plot; counts say nothing)."""
TRAINING_FIGURES = ("reward_mean", "kl", "clip_fraction")
"""Figures of training records that are plotted too (online RL's reward, KL and clip fraction)."""



def final_val(stage: StageMetrics) -> dict[str, float]:
    """The last value of every numeric val_* figure (val_by_source and other nested ones left out)."""
    return {k: v for r in stage.val for k, v in r.items() if k.startswith("val_") and is_number(v)}



def stage_summary(stage: StageMetrics) -> dict:
    """The per-stage figures of the table and of --json."""
    last = stage.train[-1] if stage.train else {}
    return {"stage": stage.name, "run_dir": str(stage.run_dir), "objective": stage.objective,
            "steps": last.get("step", 0), "steps_planned": stage.steps_planned, "tokens": last.get("tokens", 0),
            "train_loss": last.get("loss"), **final_val(stage), "seconds": stage_seconds(stage),
            "finished": stage.finished, "tokens_by_source": dict(last.get("tokens_by_source", {}))}



def token_offsets(stages: list[StageMetrics]) -> list[int]:
    """Where each stage starts on the cumulative-token axis: the tokens of the stages before it."""
    offsets, total = [], 0
    for stage in stages:
        offsets.append(total)
        total += stage.train[-1].get("tokens", 0) if stage.train else 0
    return offsets



def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_axisbelow(True)
    ax.grid(alpha=0.3)
    return fig, ax



def _stage_lines(stages: list[StageMetrics], key: str, ylabel: str, title: str, with_val: bool) -> bytes:
    """`key` of the training records against cumulative tokens, one colour per stage, a dashed line at
    each stage boundary, and (for the loss) validation loss as open markers."""
    fig, ax = _figure(title, "tokens (cumulative across stages)", ylabel)
    offsets = token_offsets(stages)
    val_labelled = False
    for i, (stage, offset) in enumerate(zip(stages, offsets)):
        points = [(offset + r.get("tokens", 0), r[key]) for r in stage.train if is_number(r.get(key))]
        if i > 0 and stage.train:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=series_colour(i), marker="o" if len(xs) == 1 else None,
                    label=f"{stage.name}{'' if stage.finished else ' (unfinished)'}")
        val = [(offset + tokens_at(stage, r["step"]), r["val_loss"]) for r in stage.val
               if is_number(r.get("val_loss"))]
        if with_val and val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, linestyle="none", marker="o", markerfacecolor="none", color=series_colour(i),
                    label=None if val_labelled else "validation loss")
            val_labelled = True
    ax.legend(fontsize="small")
    return figure_png(fig)



def plot_loss(stages: list[StageMetrics]) -> bytes:
    return _stage_lines(stages, "loss", "loss", "Training loss (lines) and validation loss (markers)", True)



def plot_objective_figures(stages: list[StageMetrics]) -> bytes:
    """One panel per figure an objective reports (reward-model accuracy and margin, DPO's rewards,
    RL's held-out and sampled reward, KL, ...) against cumulative tokens, one colour per stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    offsets = token_offsets(stages)
    series: dict[str, list] = {}
    for i, (stage, offset) in enumerate(zip(stages, offsets)):
        for r in stage.val:
            for k, v in r.items():
                if k.startswith("val_") and k not in COUNTS and is_number(v):
                    series.setdefault(k, []).append((i, offset + tokens_at(stage, r["step"]), v))
        for r in stage.train:
            for k in TRAINING_FIGURES:
                if is_number(r.get(k)):
                    series.setdefault(k, []).append((i, offset + r.get("tokens", 0), r[k]))
    columns = 2
    rows = max(1, -(-len(series) // columns))
    fig = Figure(figsize=(10, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    if not series:
        fig.text(0.5, 0.5, "no validation figures besides the loss", ha="center")
    for n, (key, points) in enumerate(series.items()):
        ax = fig.add_subplot(rows, columns, n + 1)
        ax.set(title=key, xlabel="tokens (cumulative)")
        ax.grid(alpha=0.3)
        for i in sorted({p[0] for p in points}):
            xs, ys = zip(*[(x, y) for j, x, y in points if j == i])
            ax.plot(xs, ys, color=series_colour(i), marker="o" if len(xs) < 20 else None, label=stages[i].name)
        ax.legend(fontsize="x-small")
    return figure_png(fig)


def plot_lr(stages: list[StageMetrics]) -> bytes:
    return _stage_lines(stages, "lr", "learning rate", "Learning rate", False)



def _source_labels(sources: list[str]) -> dict[str, str]:
    """Short legend labels (the last path part), the full spec wherever two would collide."""
    short = {s: Path(s).name or s for s in sources}
    counts = {label: list(short.values()).count(label) for label in short.values()}
    return {s: label if counts[label] == 1 else s for s, label in short.items()}



def all_sources(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(s for summary in summaries for s in summary["tokens_by_source"]))



def plot_tokens_by_source(summaries: list[dict]) -> bytes:
    """Tokens drawn per source, one stacked bar per stage."""
    fig, ax = _figure("Tokens drawn per source", "stage", "tokens")
    names = [s["stage"] for s in summaries]
    bottom = [0] * len(summaries)
    sources = all_sources(summaries)
    labels = _source_labels(sources)
    for i, source in enumerate(sources):
        heights = [s["tokens_by_source"].get(source, 0) for s in summaries]
        ax.bar(names, heights, bottom=bottom, color=series_colour(i), label=labels[source])
        bottom = [b + h for b, h in zip(bottom, heights)]
    if sources:
        ax.legend(fontsize="small")
    return figure_png(fig)



def val_keys(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for s in summaries for k in s if k.startswith("val_")))



def render_markdown(run: Path, summaries: list[dict]) -> str:
    """report.md: the per-stage table, the tokens-per-source table, and the plots."""
    vals = val_keys(summaries)
    header = ["stage", "objective", "steps", "tokens", "final train loss", *(f"final {k}" for k in vals),
              "seconds", "finished"]
    lines = [f"# Training report: {run}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    for s in summaries:
        steps = format_figure(s["steps"]) if s["finished"] or s["steps_planned"] is None else \
            f"{s['steps']:,} of {s['steps_planned']:,}"
        row = [escape_cell(s["stage"]), format_figure(s["objective"]), steps, format_figure(s["tokens"]), format_figure(s["train_loss"]),
               *(format_figure(s.get(k)) for k in vals), format_figure(s["seconds"], 1), "yes" if s["finished"] else "no (unfinished)"]
        lines.append("| " + " | ".join(row) + " |")
    names = [escape_cell(s["stage"]) for s in summaries]
    lines += ["", "## Tokens per source", "", "| source | " + " | ".join(names) + " | total |",
              "|---|" + "---:|" * (len(names) + 1)]
    for source in all_sources(summaries):
        counts = [s["tokens_by_source"].get(source, 0) for s in summaries]
        lines.append(f"| `{escape_cell(source)}` | " + " | ".join(f"{c:,}" for c in counts) + f" | {sum(counts):,} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{key.replace('_', ' ')}]({name})" for key, name in PLOTS.items()]
    return "\n".join(lines) + "\n"



def write_report(run: Path, out: Path | None = None) -> dict:
    """Write the PNGs and report.md into `out` (default RUN/report); return figures and paths."""
    run = Path(run)
    stages = load_stages(run)
    out = Path(out) if out is not None else run / "report"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    summaries = [stage_summary(s) for s in stages]
    files = {key: out / name for key, name in PLOTS.items()}
    atomic_write_bytes(files["loss"], plot_loss(stages))
    atomic_write_bytes(files["lr"], plot_lr(stages))
    atomic_write_bytes(files["tokens_by_source"], plot_tokens_by_source(summaries))
    atomic_write_bytes(files["objective"], plot_objective_figures(stages))
    from hybridlm.train.moe_report import plot_moe  # it imports this module's token_offsets

    atomic_write_bytes(files["moe"], plot_moe(stages))
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], render_markdown(run, summaries))
    return json_safe({"run": str(run), "out": str(out), "stages": summaries,
                      "files": {k: str(v) for k, v in files.items()}})



def format_summary(result: dict) -> str:
    """The plain-text answer: one line per stage, then where the report went."""
    lines = [f"{s['stage']} ({s['objective'] or '?'}): {s['steps']:,} steps, {s['tokens']:,} tokens, "
             f"train loss {format_figure(s['train_loss'])}{'' if s['finished'] else ', unfinished'}" for s in result["stages"]]
    return "\n".join([*lines, f"wrote {result['files']['report']} and {len(PLOTS)} plots in {result['out']}"])

