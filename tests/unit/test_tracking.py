"""MLflow tracking of real training, read back through MLflow's own client from a real SQLite
store: a two-stage recipe is one parent run with a child run per stage; each child holds the
resolved config as params, every metrics.jsonl record as step metrics, the lineage and the report
plots; a resumed run continues its MLflow run; `eval run --track` logs against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from hybridlm.cli import app
from hybridlm.errors import UserError
from hybridlm.train.recipe import plan_stages, run_recipe
from hybridlm.train.tracking import TRACKING_FILE, MlflowRun

MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}


@pytest.fixture(scope="module")
def tracked(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe = {"model": MODEL, "recipe": {"out": str(root / "run")}, "data": {"batch_size": 4, "seq_len": 32,
              "path": str(tiny_shards)}, "eval": {"every": 3, "tokens": 256},
              "train": {"log_every": 2, "dtype": "fp32", "tracking": "mlflow", "tracking_uri": uri, "experiment": "t"},
              "checkpoint": {"every": 100}, "schedule": {"warmup_steps": 1}, "optim": {"lr": 3e-3},
              "stage": [{"name": "first", "tokens": 128 * 6}, {"name": "second", "tokens": 128 * 4}]}
    run_recipe(plan_stages(recipe), progress=False)
    return root / "run", MlflowClient(tracking_uri=uri)


def run_id(directory: Path) -> str:
    return json.loads((directory / TRACKING_FILE).read_text())["run_id"]


def test_a_recipe_is_a_parent_run_with_a_child_per_stage(tracked):
    recipe_dir, client = tracked
    parent = client.get_run(run_id(recipe_dir))
    children = [client.get_run(run_id(recipe_dir / stage)) for stage in ("1-first", "2-second")]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert {"report/loss.png", "report/report.md"} <= {f.path for f in client.list_artifacts(parent.info.run_id, "report")}


def test_each_stage_run_holds_its_config_metrics_lineage_and_plots(tracked):
    recipe_dir, client = tracked
    stage = recipe_dir / "1-first"
    mlflow_run = client.get_run(run_id(stage))
    config = json.loads((stage / "config.json").read_text())
    assert mlflow_run.data.params["optim.lr"] == str(config["optim"]["lr"])
    assert mlflow_run.data.params["model.n_layer"] == "2"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == sorted(losses)  # doubles round-trip exactly
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "val_loss")) \
        == sorted(val + val[-1:])  # the summary logs the last one again, at the final step
    source = next(iter(records[0]["tokens_by_source"]))
    assert client.get_metric_history(mlflow_run.info.run_id, f"tokens_by_source.{source}")  # nested fields flattened
    artifacts = {f.path for f in client.list_artifacts(mlflow_run.info.run_id)}
    assert "lineage.json" in artifacts and "report" in artifacts


def test_a_reopened_directory_continues_its_mlflow_run_and_eval_track_logs_to_it(tracked, tmp_path):
    recipe_dir, client = tracked
    stage = recipe_dir / "2-second"
    uri = json.loads((stage / TRACKING_FILE).read_text())["uri"]
    again = MlflowRun.open(stage, uri, "t")
    assert again.run_id == run_id(stage) and client.get_run(again.run_id).info.status == "RUNNING"
    again.finish()
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": f"x{i} is", "choices": [" 1", " 2"], "label": i % 2}) + "\n"
                             for i in range(6)))
    result = CliRunner().invoke(app, ["eval", "run", "--model", str(stage), "--tasks", f"mc:{items}", "--track",
                                      "--json", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mlflow_run_id"] == run_id(stage)
    accuracy = doc["tasks"][f"mc:{items}"]["metrics"]["acc"]
    logged = client.get_run(run_id(stage)).data.metrics
    assert logged[f"eval.tasks.mc:{items}.metrics.acc"] == pytest.approx(accuracy)
    assert any(f.path.startswith("eval/eval-") for f in client.list_artifacts(run_id(stage), "eval"))
    untracked = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tmp_path), "--tasks",
                                f"mc:{items}", "--track"], capture_output=True, text=True, timeout=120)
    assert untracked.returncode == 2 and "was not trained with train.tracking" in untracked.stderr
    assert len(untracked.stderr.strip().splitlines()) == 1


def test_tracking_needs_a_reachable_store_and_a_tracked_run(tmp_path):
    with pytest.raises(UserError, match="cannot reach the MLflow tracking store"):
        MlflowRun.open(tmp_path / "run", "http://127.0.0.1:9/", "t")
    from hybridlm.train.tracking import tracked_run

    with pytest.raises(UserError, match="was not trained with train.tracking"):
        tracked_run(tmp_path)


def test_a_failing_tracking_store_warns_once_and_does_not_stop_training(tracked):
    _, client = tracked
    run = MlflowRun(client, "0" * 32)  # a run the store does not have: every write fails
    with pytest.warns(UserWarning, match="MLflow tracking stopped at step 3"):
        run.log_metrics({"step": 3, "loss": 1.0})
    assert run.failed
    run.log_metrics({"step": 4, "loss": 0.9})  # no second warning, no exception
