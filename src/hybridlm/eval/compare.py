"""`hybridlm eval report`: one markdown report and bar charts comparing models (e.g. hybrid vs dense)
from the JSON that `hybridlm eval run --json` and `hybridlm eval efficiency --json` print.

The report is drawn only from those files, so results computed on different machines or days can
be put side by side; every file is checked against the two shapes first, so a wrong file is named
with what was expected instead of surfacing as a KeyError halfway through writing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.units import FIELDS, display, format_value
from hybridlm.fileio import atomic_write_bytes, atomic_write_text, read_json
from hybridlm.report_format import (
    MISSING,
    escape_cell,
    figure_png,
    format_figure,
    markdown_table,
    series_colour,
)

TASKS_SHAPE = ('`hybridlm eval run --json` output {"model": RUN, "tasks": {TASK: {"metrics": {NAME: number}, '
               '"stderr": {NAME: number}, "n": items}}}')
EFFICIENCY_SHAPE = '`hybridlm eval efficiency --json` output {"model": RUN, "efficiency": {FIELD: {"value", "unit"}}}'


@dataclass
class Result:
    """One results file: its kind ("tasks" or "efficiency"), the model it measured, its document."""

    path: Path
    kind: str
    model: str
    doc: dict


def _number(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _tasks_problem(tasks: object) -> str | None:
    if not isinstance(tasks, dict) or not tasks:
        return '"tasks" is not a non-empty object'
    for name, task in tasks.items():
        metrics = task.get("metrics") if isinstance(task, dict) else None
        if not isinstance(metrics, dict) or not metrics:
            return f'tasks.{name} has no "metrics" object'
        stderr = task.get("stderr", {})
        if not isinstance(stderr, dict) or not all(_number(v) for v in [*metrics.values(), *stderr.values()]):
            return f"tasks.{name} has a metric or stderr that is not a number"
    return None


def _efficiency_problem(fields: object) -> str | None:
    if not isinstance(fields, dict) or not fields:
        return '"efficiency" is not a non-empty object'
    for name, item in fields.items():
        if not isinstance(item, dict) or not _number(item.get("value")) or not isinstance(item.get("unit"), str):
            return f'efficiency.{name} is not {{"value": number, "unit": text}}'
    return None


def load_result(path: Path) -> Result:
    """Read and check one results file; UserError naming the file and the expected shape."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; give JSON files written by `hybridlm eval run --json` "
                        "or `hybridlm eval efficiency --json`")
    doc = read_json(path, "results file")
    kind = next((k for k in ("tasks", "efficiency") if isinstance(doc, dict) and k in doc), None)
    if kind is None:
        raise UserError(f"{path} is neither {TASKS_SHAPE} nor {EFFICIENCY_SHAPE}")
    problem = (_tasks_problem if kind == "tasks" else _efficiency_problem)(doc[kind])
    if not isinstance(doc.get("model"), str) or not doc["model"]:
        problem = '"model" (the run directory) is missing'
    if problem:
        raise UserError(f"{path}: {problem}; expected {TASKS_SHAPE if kind == 'tasks' else EFFICIENCY_SHAPE}")
    return Result(path, kind, doc["model"], doc)


def model_labels(models: list[str]) -> dict[str, str]:
    """Run directory names; models whose names collide get as many parent directories as it takes."""
    labels = {m: Path(m).name or m for m in dict.fromkeys(models)}
    for depth in range(2, max(len(Path(m).parts) for m in labels) + 1):
        clashing = [m for m in labels if list(labels.values()).count(labels[m]) > 1]
        if not clashing:
            break
        for m in clashing:
            labels[m] = "/".join(Path(m).parts[-depth:])
    return labels


def column_names(results: list[Result]) -> list[str]:
    """A column per result: its model's label, plus the file name where one model has several
    results of the same kind (e.g. bf16 and fp32 efficiency runs)."""
    labels = model_labels([r.model for r in results])
    names = []
    for r in results:
        twins = [o for o in results if o.kind == r.kind and o.model == r.model]
        name = labels[r.model] if len(twins) == 1 else f"{labels[r.model]} [{r.path.stem}]"
        names.append(name if name not in names else f"{name} #{len(names) + 1}")
    return names


def _metric_cell(task: dict, metric: str) -> str:
    value, stderr = task["metrics"].get(metric), task.get("stderr", {}).get(metric)
    return MISSING if value is None else format_figure(value) + (f" ± {format_figure(stderr)}" if stderr is not None else "")


def task_rows(results: list[Result]) -> list[tuple[str, str]]:
    """(task, metric) pairs in first-seen order."""
    return list(dict.fromkeys((t, m) for r in results for t, task in r.doc["tasks"].items() for m in task["metrics"]))


def tasks_markdown(results: list[Result], names: list[str]) -> list[str]:
    """The tasks table (task, metric, one column per model: value ± stderr), items per task, settings."""
    rows = [[escape_cell(task), escape_cell(metric), *(_metric_cell(r.doc["tasks"][task], metric) if task in r.doc["tasks"]
                                           else MISSING for r in results)] for task, metric in task_rows(results)]
    for task in dict.fromkeys(t for t, _ in task_rows(results)):
        rows.append([escape_cell(task), "items", *(format_figure(r.doc["tasks"].get(task, {}).get("n")) for r in results)])
    settings = [f"- {escape_cell(name)}: " + ", ".join(f"{k} {escape_cell(str(r.doc.get(k)).lower())}"  # limit None -> none
                                                 for k in ("shots", "seed", "limit")) for name, r in zip(names, results)]
    return ["## Tasks", "", *markdown_table(["task", "metric", *names], rows, 2), "", *settings]


def efficiency_keys(results: list[Result]) -> list[str]:
    """The fields present, in the method's table order, then any others."""
    present = list(dict.fromkeys(k for r in results for k in r.doc["efficiency"]))
    return [k for k in FIELDS if k in present] + [k for k in present if k not in FIELDS]


def _efficiency_cell(result: Result, key: str) -> str:
    item = result.doc["efficiency"].get(key)
    return MISSING if item is None else escape_cell(format_value(item["value"], item["unit"]))


def _method_line(key: str, said: dict[str, str | None]) -> str | None:
    """How a field was obtained: once when every model says the same, else per model."""
    if not any(said.values()):
        return None
    if len(set(said.values())) == 1:
        return f"- {FIELDS.get(key, key)}: {escape_cell(str(next(iter(said.values()))))}"
    return f"- {FIELDS.get(key, key)}: " + "; ".join(f"{escape_cell(n)}: {escape_cell(m)}" for n, m in said.items() if m)


def efficiency_markdown(results: list[Result], names: list[str]) -> list[str]:
    """The efficiency table (field x model, values in readable units) and how each was obtained."""
    keys = efficiency_keys(results)
    rows = [[escape_cell(FIELDS.get(k, k)), *(_efficiency_cell(r, k) for r in results)] for k in keys]
    methods = [_method_line(k, {n: r.doc["efficiency"][k].get("method") for n, r in zip(names, results)
                                if k in r.doc["efficiency"]}) for k in keys]
    return ["## Efficiency", "", *markdown_table(["field", *names], rows, 1), "", "How each figure was obtained:", "",
            *(m for m in methods if m)]


def _grid(n: int, title: str):
    """A figure of n small bar charts, three to a row, on matplotlib's Agg canvas (as train/report.py)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    for ax in axes:
        ax.set_axisbelow(True)
        ax.grid(axis="y", alpha=0.3)
    return fig, axes


def plot_tasks(results: list[Result], names: list[str]) -> bytes:
    """One chart per metric: a group of bars per task, one bar per model, stderr as error bars."""
    pairs = task_rows(results)
    metrics = list(dict.fromkeys(m for _, m in pairs))
    fig, axes = _grid(len(metrics), "Tasks: models compared per metric")
    width = 0.8 / len(results)
    for ax, metric in zip(axes, metrics):
        tasks = [t for t, m in pairs if m == metric]
        for i, (name, r) in enumerate(zip(names, results)):
            got = [r.doc["tasks"].get(t, {}) for t in tasks]
            values = [g.get("metrics", {}).get(metric) for g in got]
            errors = [math.nan if (e := g.get("stderr", {}).get(metric)) is None else e for g in got]  # nan: no bar
            ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(tasks))],
                   [math.nan if v is None else v for v in values], width, yerr=errors, capsize=3,
                   color=series_colour(i), label=name)
        ax.set(title=metric, xticks=range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=20, fontsize="small")
    axes[0].legend(fontsize="small")
    return figure_png(fig)


def plot_efficiency(results: list[Result], names: list[str]) -> bytes:
    """One chart per efficiency field, one bar per model, in the unit people read."""
    keys = efficiency_keys(results)
    fig, axes = _grid(len(keys), "Efficiency: models compared per figure")
    for ax, key in zip(axes, keys):
        values = [r.doc["efficiency"].get(key, {}).get("value") for r in results]
        unit = next(r.doc["efficiency"][key]["unit"] for r in results if key in r.doc["efficiency"])
        peak = max((abs(v) for v in values if v is not None), default=0)
        shown_peak, shown_unit = display(peak, unit)  # one unit per chart, chosen by its largest bar
        factor = shown_peak / peak if peak else 1.0
        ax.bar(range(len(names)), [math.nan if v is None else v * factor for v in values],
               color=[series_colour(i) for i in range(len(names))])
        ax.set(title=FIELDS.get(key, key), ylabel=shown_unit, xticks=range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize="small")
    return figure_png(fig)


def write_eval_report(paths: list[Path], out: Path) -> dict:
    """report.md plus tasks.png and/or efficiency.png in `out`, for the kinds of results given."""
    if not paths:
        raise UserError("no results files given; pass JSON files written by `hybridlm eval run --json` "
                        "or `hybridlm eval efficiency --json`")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    results = [load_result(Path(p)) for p in paths]
    names = column_names(results)
    lines, files = ["# Evaluation report", ""], {}
    lines += [f"- {escape_cell(n)}: `{escape_cell(r.model)}` (from {escape_cell(str(r.path))})" for n, r in zip(names, results)]
    for kind, markdown, plot in (("tasks", tasks_markdown, plot_tasks),
                                 ("efficiency", efficiency_markdown, plot_efficiency)):
        chosen = [(n, r) for n, r in zip(names, results) if r.kind == kind]
        if chosen:
            kind_names, kind_results = [n for n, _ in chosen], [r for _, r in chosen]
            files[kind] = out / f"{kind}.png"
            atomic_write_bytes(files[kind], plot(kind_results, kind_names))
            lines += ["", *markdown(kind_results, kind_names), "", f"![{kind}]({files[kind].name})"]
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], "\n".join(lines) + "\n")
    return {"out": str(out), "models": names, "files": {k: str(v) for k, v in files.items()}}
