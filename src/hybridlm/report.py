"""`hybridlm report`: PNG plots and a markdown summary of a training run or of a recipe's stages.

Everything is read from what training already writes (metrics.jsonl, config.json and whether
model.safetensors exists), so a report can be drawn while a recipe is still running or after it
was killed. Plots use matplotlib's Agg canvas directly: no display, no pyplot global state.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes, atomic_write_text, read_json
from hybridlm.train.metrics import read_metrics

STAGE_DIR = re.compile(r"^(\d+)-(.+)$")
PLOTS = {"loss": "loss.png", "lr": "lr.png", "tokens_by_source": "tokens_by_source.png"}
MISSING = "—"


@dataclass
class StageMetrics:
    """One run directory's records, split into training and validation records."""

    name: str
    run_dir: Path
    objective: str | None
    steps_planned: int | None
    finished: bool
    train: list[dict]
    val: list[dict]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_stage(name: str, run_dir: Path) -> StageMetrics:
    """A run directory as a stage: its config (if written yet) and its metrics records."""
    config = read_json(run_dir / "config.json", "run config") if (run_dir / "config.json").is_file() else {}
    train_cfg = config.get("train", {}) if isinstance(config, dict) else {}
    records = read_metrics(run_dir / "metrics.jsonl")
    finished = (run_dir / "model.safetensors").is_file()
    train = [r for r in records if _is_number(r.get("loss"))]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    if finished and not train:
        raise UserError(f"{run_dir}/metrics.jsonl is missing or holds no training records; "
                        "the report is drawn from it")
    return StageMetrics(name, run_dir, train_cfg.get("objective"), train_cfg.get("steps"), finished, train, val)


def find_stages(run: Path) -> list[tuple[str, Path]]:
    """(name, directory) per stage: RUN itself for a run directory, else the recipe's `<i>-<name>`
    stage directories in stage order."""
    if not run.exists():
        raise UserError(f"{run} not found; give a run directory or a recipe's output directory")
    if not run.is_dir():
        raise UserError(f"{run} is a file; give a run directory or a recipe's output directory")
    if (run / "config.json").is_file() or (run / "metrics.jsonl").is_file():
        match = STAGE_DIR.match(run.name)
        return [(match.group(2) if match else run.name, run)]
    stages = sorted((int(m.group(1)), m.group(2), p) for p in run.iterdir()
                    if p.is_dir() and (m := STAGE_DIR.match(p.name))
                    and ((p / "config.json").is_file() or (p / "metrics.jsonl").is_file()))
    if not stages:
        raise UserError(f"{run} is neither a run directory (config.json, metrics.jsonl) nor a recipe output "
                        "directory (stage directories named <i>-<name>); give what `hybridlm train` wrote")
    return [(name, path) for _, name, path in stages]


def load_stages(run: Path) -> list[StageMetrics]:
    """Every stage of RUN; a stage not yet logging is kept (as unfinished), but one must have records."""
    stages = [load_stage(name, path) for name, path in find_stages(run)]
    if not any(s.train for s in stages):
        where = stages[0].run_dir / "metrics.jsonl" if len(stages) == 1 else f"any stage under {run}"
        raise UserError(f"no training records in {where}; train first (metrics.jsonl is missing or empty)")
    return stages


def tokens_at(stage: StageMetrics, step: int) -> float:
    """Tokens drawn by `step`, interpolated between training records (exact where one was logged);
    batch shapes may grow during a run, so steps times a constant would misplace the point."""
    import numpy as np

    points = [(0, 0)] + [(r["step"], r["tokens"]) for r in stage.train if _is_number(r.get("tokens"))]
    steps, tokens = zip(*points)
    return float(np.interp(step, steps, tokens))


def stage_seconds(stage: StageMetrics) -> float:
    """Training seconds (evaluations excluded) summed over resumed segments: train_s restarts at
    each resume, and tokens - tok_s * train_s gives back the tokens each segment started from.
    Records written before train_s existed count elapsed_s."""
    segments: dict[int, float] = {}
    for r in stage.train:
        tokens, tok_s, elapsed = r.get("tokens"), r.get("tok_s"), r.get("train_s", r.get("elapsed_s"))
        if not all(_is_number(v) and math.isfinite(v) for v in (tokens, tok_s, elapsed)):
            continue
        start = round(tokens - tok_s * elapsed)
        segments[start] = max(segments.get(start, 0.0), elapsed)
    return sum(segments.values())


def final_val(stage: StageMetrics) -> dict[str, float]:
    """The last value of every numeric val_* figure (val_by_source and other nested ones left out)."""
    return {k: v for r in stage.val for k, v in r.items() if k.startswith("val_") and _is_number(v)}


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


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def series_colour(index: int) -> str:
    return f"C{index % 10}"


def _stage_lines(stages: list[StageMetrics], key: str, ylabel: str, title: str, with_val: bool) -> bytes:
    """`key` of the training records against cumulative tokens, one colour per stage, a dashed line at
    each stage boundary, and (for the loss) validation loss as open markers."""
    fig, ax = _figure(title, "tokens (cumulative across stages)", ylabel)
    offsets = token_offsets(stages)
    val_labelled = False
    for i, (stage, offset) in enumerate(zip(stages, offsets)):
        points = [(offset + r.get("tokens", 0), r[key]) for r in stage.train if _is_number(r.get(key))]
        if i > 0 and stage.train:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=series_colour(i), marker="o" if len(xs) == 1 else None,
                    label=f"{stage.name}{'' if stage.finished else ' (unfinished)'}")
        val = [(offset + tokens_at(stage, r["step"]), r["val_loss"]) for r in stage.val
               if _is_number(r.get("val_loss"))]
        if with_val and val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, linestyle="none", marker="o", markerfacecolor="none", color=series_colour(i),
                    label=None if val_labelled else "validation loss")
            val_labelled = True
    ax.legend(fontsize="small")
    return figure_png(fig)


def plot_loss(stages: list[StageMetrics]) -> bytes:
    return _stage_lines(stages, "loss", "loss", "Training loss (lines) and validation loss (markers)", True)


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


def format_figure(value: object, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


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


def json_safe(value: object) -> object:
    """NaN and infinity (a diverged loss) become null, so --json stays one valid JSON document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(run: Path, out: Path | None = None) -> dict:
    """Write the three PNGs and report.md into `out` (default RUN/report); return figures and paths."""
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
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], render_markdown(run, summaries))
    return json_safe({"run": str(run), "out": str(out), "stages": summaries,
                      "files": {k: str(v) for k, v in files.items()}})


def format_summary(result: dict) -> str:
    """The plain-text answer: one line per stage, then where the report went."""
    lines = [f"{s['stage']} ({s['objective'] or '?'}): {s['steps']:,} steps, {s['tokens']:,} tokens, "
             f"train loss {format_figure(s['train_loss'])}{'' if s['finished'] else ', unfinished'}" for s in result["stages"]]
    return "\n".join([*lines, f"wrote {result['files']['report']} and {len(PLOTS)} plots in {result['out']}"])
