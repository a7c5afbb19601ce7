"""Experiment tracking in MLflow (`train.tracking = "mlflow"`): a copy of what the run directory
records, in the tool teams already browse. The run directory stays the source of truth.

A training run logs its resolved config as params, every metrics.jsonl record as step metrics, its
summary, lineage.json and the `hybridlm report` plots as artifacts. A recipe is one parent run
with a child run per stage. The MLflow run id is kept in the run directory (tracking.json), so a
resumed run continues its MLflow run and `hybridlm eval ... --track` logs against it.

Why MlflowClient and not the fluent `mlflow.start_run`: no process-global active run, so two runs
in one process (tests, recipes) cannot log into each other.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json

TRACKING_FILE = "tracking.json"
"""{"uri", "run_id"} of a directory's MLflow run."""
_BATCH = 100  # MLflow takes at most 100 params (1000 metrics) per log_batch call


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""For a tracking server that is down: MLflow's own defaults retry for minutes before they fail;
these fail in seconds (the environment variables, when set, win)."""


def mlflow_client(uri: str):
    """An MlflowClient for `uri` ("" = MLflow's own default: $MLFLOW_TRACKING_URI or ./mlflow.db)."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError("MLflow tracking needs the [mlops] extra: pip install 'hybridlm[mlops]'") from None
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri or None, registry_uri=uri or None)


def flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}."""
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (MLflow would use
    ./mlruns under whatever directory the process runs in); a server's own default otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


class MlflowRun:
    """One MLflow run that a run directory (or a recipe directory) logs to."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.failed = ""
        """Why step metrics stopped reaching MLflow, once they did (training goes on without them)."""

    @classmethod
    def open(cls, directory: Path, uri: str, experiment: str, *, parent: str | None = None) -> MlflowRun:
        """The run recorded in DIRECTORY/tracking.json when it is there (a resume), else a new one."""
        from mlflow.exceptions import MlflowException

        recorded = directory / TRACKING_FILE
        try:
            client = mlflow_client(uri)
            if recorded.is_file():
                doc = read_json(recorded, "tracking record")
                if doc.get("uri") == uri:
                    client.update_run(doc["run_id"], status="RUNNING")
                    return cls(client, doc["run_id"])
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_root(uri))
            tags = {"hybridlm.run_dir": str(directory.resolve())} | ({"mlflow.parentRunId": parent} if parent else {})
            run = client.create_run(experiment_id, run_name=directory.name, tags=tags)
        except MlflowException as exc:
            raise UserError(f"cannot reach the MLflow tracking store {uri or '(default)'}: "
                            f"{str(exc).splitlines()[0]}; check train.tracking_uri") from None
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded, {"uri": uri, "run_id": run.info.run_id})
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # a resume logs the same config again
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH])

    def log_metrics(self, record: dict, step: int | None = None) -> None:
        """The numeric fields of a metrics record (nested dicts flattened), at its step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = record.get("step", 0) if step is None else step
        values = [Metric(k, float(v), now, step) for k, v in flatten(record).items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
        if self.failed:
            return
        try:
            for start in range(0, len(values), 1000):
                self.client.log_batch(self.run_id, metrics=values[start : start + 1000])
        except Exception as exc:  # noqa: BLE001 - a tracking server that goes away must not stop training
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"MLflow tracking stopped at step {step} ({self.failed}); training goes on and "
                          "metrics.jsonl keeps every record", stacklevel=2)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_report(self, directory: Path) -> None:
        """`hybridlm report`'s plots and report.md of `directory`, under report/."""
        from hybridlm.train.report import write_report

        with tempfile.TemporaryDirectory() as tmp:
            write_report(directory, Path(tmp))
            self.client.log_artifacts(self.run_id, tmp, "report")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def tracked_run(directory: Path) -> MlflowRun:
    """The MLflow run a trained directory logged to (for `eval --track`)."""
    recorded = Path(directory) / TRACKING_FILE
    if not recorded.is_file():
        raise UserError(f"{directory} was not trained with train.tracking = \"mlflow\" (no {TRACKING_FILE}); "
                        "retrain it with tracking on, or leave out --track")
    doc = read_json(recorded, "tracking record")
    return MlflowRun(mlflow_client(doc["uri"]), doc["run_id"])


def log_evaluation(directory: Path, kind: str, result: dict) -> str:
    """Log an `eval run` / `eval efficiency` result against the MLflow run that trained DIRECTORY:
    its numbers as `KIND.…` metrics, the whole document as an artifact; returns the run id."""
    run = tracked_run(directory)
    numbers = {re.sub(r"[^\w\-. :/]", "_", key): value for key, value in flatten(result).items()}
    run.log_metrics({f"{kind}.{key}": value for key, value in numbers.items()}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        run.log_file(path, "eval")
    return run.run_id
