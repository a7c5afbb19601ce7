"""metrics.jsonl: one JSON record per line, appended during training, read by resume, by reports and
by `eval efficiency` (a run's stages, their records, training time and tokens)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_text, read_json
from hybridlm.run import final_weights

STAGE_DIR = re.compile(r"^(\d+)-(.+)$")



def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut off by a kill is skipped; a bad line before
    it means the file was damaged, which a report should not paper over."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif index < len(lines) - 1:
            raise UserError(f"{path}: line {number} is not a metrics record; the file is damaged "
                            "(only a cut-off last line is skipped)")
    return records


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the checkpoint are dropped first. With a
    tracker, every record also goes to its MLflow run."""

    def __init__(self, path: Path, keep_until_step: int | None, write: bool = True, tracker=None) -> None:
        self.path, self.active, self.tracker = path, write, tracker
        if not write:
            return
        if keep_until_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r["step"] <= keep_until_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif keep_until_step is None:
            atomic_write_text(path, "")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:  # an MlflowRun (train.tracking): the same record, as step metrics
            self.tracker.log_metrics(record)


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



def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



def load_stage(name: str, run_dir: Path) -> StageMetrics:
    """A run directory as a stage: its config (if written yet) and its metrics records."""
    config = read_json(run_dir / "config.json", "run config") if (run_dir / "config.json").is_file() else {}
    train_cfg = config.get("train", {}) if isinstance(config, dict) else {}
    records = read_metrics(run_dir / "metrics.jsonl")
    finished = final_weights(run_dir) is not None
    train = [r for r in records if is_number(r.get("loss"))]
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

    points = [(0, 0)] + [(r["step"], r["tokens"]) for r in stage.train if is_number(r.get("tokens"))]
    steps, tokens = zip(*points)
    return float(np.interp(step, steps, tokens))



def stage_seconds(stage: StageMetrics) -> float:
    """Training seconds (evaluations excluded) summed over resumed segments: train_s restarts at
    each resume, and tokens - tok_s * train_s gives back the tokens each segment started from.
    Records written before train_s existed count elapsed_s."""
    segments: dict[int, float] = {}
    for r in stage.train:
        tokens, tok_s, elapsed = r.get("tokens"), r.get("tok_s"), r.get("train_s", r.get("elapsed_s"))
        if not all(is_number(v) and math.isfinite(v) for v in (tokens, tok_s, elapsed)):
            continue
        start = round(tokens - tok_s * elapsed)
        segments[start] = max(segments.get(start, 0.0), elapsed)
    return sum(segments.values())

