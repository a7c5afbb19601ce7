"""`hybridlm scaling fit`: scaling laws fitted to finished run directories, with plots.

Each run gives one point: its parameters N (all, and outside the embeddings; both are fitted,
as Kaplan et al. count non-embedding parameters and Chinchilla all of them), the tokens it
trained on D and its last validation loss (metrics.jsonl). Runs must share one tokenizer: losses
in nats per token are not comparable across vocabularies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridlm.analysis.scaling_fit import huber_fit, optimal_frontier, power_law_fit
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from hybridlm.model.info import count_params
from hybridlm.report_format import figure_png
from hybridlm.train.config import run_config_from_dict

FORMS = ("kaplan", "chinchilla")
MIN_SIZES = 3
MIN_CHINCHILLA_RUNS = 6


@dataclass(frozen=True)
class RunPoint:
    path: str
    params: int
    params_non_embedding: int
    tokens: int
    val_loss: float
    tokenizer: str


def read_point(run_dir: Path) -> RunPoint:
    run_dir = Path(run_dir)
    config, metrics, tokenizer = run_dir / "config.json", run_dir / "metrics.jsonl", run_dir / "tokenizer.json"
    if not config.is_file() or not metrics.is_file() or not tokenizer.is_file():
        raise UserError(f"{run_dir} is not a finished hybridlm run directory (config.json, metrics.jsonl and "
                        "tokenizer.json needed)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tokens = [r["tokens"] for r in records if "tokens" in r]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    if not tokens or not losses:
        raise UserError(f"{run_dir}/metrics.jsonl has no training tokens or no validation loss; set eval.every so "
                        "the run evaluates")
    params, non_embedding = count_params(run_config_from_dict(read_json(config, "run config")).model)
    return RunPoint(str(run_dir), params, non_embedding, int(tokens[-1]), float(losses[-1]),
                    sha256_file(tokenizer))


def check_points(points: list[RunPoint], form: str) -> None:
    if form not in FORMS:
        raise UserError(f"--form must be one of {', '.join(FORMS)} (got {form!r})")
    tokenizers = {p.tokenizer for p in points}
    if len(tokenizers) > 1:
        groups = {t: [p.path for p in points if p.tokenizer == t] for t in tokenizers}
        raise UserError("runs from different tokenizers cannot share a fit (losses per token differ): "
                        + "; ".join(f"{t[:12]}: {', '.join(paths)}" for t, paths in groups.items()))
    sizes = len({p.params for p in points})
    if sizes < MIN_SIZES:
        raise UserError(f"a fit needs runs of at least {MIN_SIZES} model sizes (got {sizes})")
    if form == "chinchilla" and (len(points) < MIN_CHINCHILLA_RUNS or len({p.tokens for p in points}) < 2):
        raise UserError(f"the chinchilla form needs at least {MIN_CHINCHILLA_RUNS} runs over two or more token budgets "
                        f"(got {len(points)} runs, {len({p.tokens for p in points})} budgets)")


def fit_runs(run_dirs: list[Path], form: str = "kaplan", *, seed: int = 0, out: Path | None = None) -> dict:
    points = [read_point(path) for path in run_dirs]
    check_points(points, form)
    losses = np.array([p.val_loss for p in points])
    tokens = np.array([p.tokens for p in points], dtype=float)
    fits = {}
    for count in ("params", "params_non_embedding"):
        n = np.array([getattr(p, count) for p in points], dtype=float)
        if form == "kaplan":
            fits[count] = {"power_law": power_law_fit(n, losses, seed=seed), "irreducible": huber_fit(n, losses, seed=seed)}
        else:
            fits[count] = huber_fit(n, losses, tokens, seed=seed)
    document = {"form": form, "runs": [p.__dict__ for p in points], "fits": fits}
    if out is not None:
        document["files"] = write_plots(Path(out), document)
        atomic_write_json(Path(out) / "scaling.json", document)
    return document


def write_plots(out: Path, document: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, form = document["runs"], document["form"]
    n = np.array([r["params"] for r in runs], dtype=float)
    losses = np.array([r["val_loss"] for r in runs])
    grid = np.geomspace(n.min() / 2, n.max() * 2, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(n, losses, color="k", label="runs")
    fit = document["fits"]["params"]
    if form == "kaplan":
        law, floor = fit["power_law"]["parameters"], fit["irreducible"]["parameters"]
        ax.plot(grid, (law["N_c"] / grid) ** law["alpha"], label=f"(N_c/N)^α, α = {law['alpha']:.3f}")
        ax.plot(grid, floor["E"] + floor["A"] / grid ** floor["alpha"], label=f"E + A/N^α, α = {floor['alpha']:.3f}")
    else:
        p = fit["parameters"]
        for budget in sorted({r["tokens"] for r in runs}):
            ax.plot(grid, p["E"] + p["A"] / grid ** p["alpha"] + p["B"] / budget ** p["beta"], label=f"D = {budget:,}")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("parameters N"), ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    files = {"fit": out / "scaling_fit.png"}
    atomic_write_bytes(files["fit"], figure_png(fig))
    plt.close(fig)
    if form == "chinchilla":
        compute = np.geomspace(6 * n.min() * min(r["tokens"] for r in runs) / 10,
                               6 * n.max() * max(r["tokens"] for r in runs) * 10, 100)
        n_opt, _ = optimal_frontier(fit["parameters"], compute)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(compute, n_opt, label=f"N_opt ∝ C^{fit['optimal_size_exponent']:.2f}")
        ax.scatter([6 * r["params"] * r["tokens"] for r in runs], n, color="k", label="runs")
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("compute C = 6ND (FLOPs)"), ax.set_ylabel("N")
        ax.legend(fontsize=7)
        files["frontier"] = out / "compute_frontier.png"
        atomic_write_bytes(files["frontier"], figure_png(fig))
        plt.close(fig)
    return {k: str(v) for k, v in files.items()}


def format_fit(document: dict) -> str:
    lines = [f"{len(document['runs'])} runs, form {document['form']}"]
    for count, fit in document["fits"].items():
        parts = fit.items() if document["form"] == "kaplan" else [("huber", fit)]
        for name, one in parts:
            shown = ", ".join(f"{k} {v:.4g} [{one['ci95'][k][0]:.4g}, {one['ci95'][k][1]:.4g}]"
                              for k, v in one["parameters"].items())
            lines.append(f"N = {count:<22} {name:<12} {shown}")
    return "\n".join(lines)
