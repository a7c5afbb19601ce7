"""The task registry and `hybridlm eval run`: names -> prepared tasks -> one results document.

Every task is prepared (files read, shots drawn) before the model is loaded, so bad input fails
before any scoring. The document's shape is read by `hybridlm eval report`:
{"model", "seed", "shots", "limit", "tasks": {name: {"metrics", "n", "stderr"}}}.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.eval.tasks import (
    arc,
    generation,
    glue,
    gsm8k,
    hellaswag,
    lambada,
    logiqa,
    math500,
    multiple_choice,
    piqa,
    race,
    record,
    squad,
    sst2,
    superglue,
    wikitext,
)
from hybridlm.eval.tasks.base import EvalOptions, PreparedTask, TaskFactory

TASKS: dict[str, TaskFactory] = {
    "hellaswag": hellaswag.prepare,
    "piqa": piqa.prepare,
    "arc_easy": partial(arc.prepare, "arc_easy"),
    "arc_challenge": partial(arc.prepare, "arc_challenge"),
    "lambada": lambada.prepare,
    "wikitext2": wikitext.prepare,
    "sst2": sst2.prepare,
    **{name: partial(glue.prepare, name) for name in glue.SPECS},
    "stsb": glue.prepare_stsb,
    **{name: partial(superglue.prepare, name) for name in superglue.SPECS},
    "multirc": superglue.prepare_multirc,
    "record": record.prepare,
    "logiqa": logiqa.prepare,
    "gsm8k": gsm8k.prepare,
    "gsm8k_cot": gsm8k.prepare_cot,
    "minerva_math500": math500.prepare,
    "race": race.prepare,
    **{name: partial(squad.prepare, name) for name in squad.FILES},
    "alpaca_gen": generation.prepare_alpaca,
}
GROUPS: dict[str, tuple[Callable[[EvalOptions], list[str]], Callable[[dict[str, dict]], dict]]] = {
    "glue": (glue.available, glue.glue_average),
    "superglue": (superglue.available, superglue.superglue_average),
}
"""Group name -> (its tasks present in the data directory, the group's summary from their results)."""
PATH_TASKS: dict[str, Callable[[str, EvalOptions], PreparedTask]] = {
    multiple_choice.PREFIX: multiple_choice.prepare_generic,  # mc:PATH.jsonl
    generation.PREFIX: generation.prepare_file,  # gen:PATH (an instruction file)
}


def known_tasks() -> str:
    return ", ".join([*TASKS, *(f"{prefix}PATH" for prefix in PATH_TASKS)]) + f"; groups: {', '.join(GROUPS)}"


def task_names(text: str) -> list[str]:
    """Comma-separated task names, checked against the registry (duplicates dropped)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError(f"--tasks is empty; known tasks: {known_tasks()}")
    for name in names:
        if name not in TASKS and name not in GROUPS and not name.startswith(tuple(PATH_TASKS)):
            raise UserError(f"unknown task {name!r}; known tasks: {known_tasks()}")
    return names


def prepare_task(name: str, options: EvalOptions) -> PreparedTask:
    for prefix, factory in PATH_TASKS.items():
        if name.startswith(prefix):
            return factory(name, options)
    return TASKS[name](options)


def run_tasks(model: Path, names: list[str], options: EvalOptions, *, batch_size: int = 16, dtype: str = "auto",
              progress: Callable[[str], None] | None = None) -> dict:
    """Score a run on the named tasks; returns the results document."""
    from hybridlm.eval.scoring import Scorer

    groups = [name for name in names if name in GROUPS]
    tasks = list(dict.fromkeys(t for name in names for t in (GROUPS[name][0](options) if name in GROUPS else [name])))
    for group in groups:
        if not GROUPS[group][0](options):
            raise UserError(f"none of the {group} tasks' files are under {options.data_dir}; point --data-dir at "
                            "a copy of shared/data")
    prepared = {name: prepare_task(name, options) for name in tasks}
    scorer = Scorer.from_path(model, batch_size=batch_size, dtype=dtype)
    results = {}
    for name, task in prepared.items():
        if progress:
            progress(f"scoring {name}")
        results[name] = task.score(scorer)
    for group in groups:
        results[group] = GROUPS[group][1](results)
    return {"model": str(model), "seed": options.seed, "shots": options.shots, "limit": options.limit,
            "tasks": results}


def format_results(document: dict) -> str:
    """One line per task and metric: value, +- standard error where there is one, items."""
    lines = [f"{document['model']}  (shots {document['shots']}, seed {document['seed']})"]
    width = max(16, *(len(name) for name in document["tasks"]))
    for name, result in document["tasks"].items():
        for metric, value in result["metrics"].items():
            error = result["stderr"].get(metric)
            spread = f" +- {_number(error)}" if error is not None else ""
            lines.append(f"{name:<{width}} {metric:<12} {_number(value):>10}{spread}  (n={result['n']:,})")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
