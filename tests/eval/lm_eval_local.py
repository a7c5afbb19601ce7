"""For the parity tests: lm-evaluation-harness's own task definitions on local items (a task YAML
that includes lm-eval's and replaces only the data source), lm-eval run offline, and `hybridlm
eval run` on the same items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import SHARED_DATA


def lm_eval_tasks() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_local_task(tasks_dir: Path, included: str, name: str, data_files: dict[str, Path], extra: str = "") -> None:
    """TASKS_DIR/NAME.yaml: lm-eval's task `included` (a path under lm_eval/tasks) reading JSON lines."""
    tasks_dir.mkdir(exist_ok=True)
    files = "".join(f"    {split}: {path}\n" for split, path in data_files.items())
    (tasks_dir / f"{name}.yaml").write_text(f"include: {lm_eval_tasks() / included}\ntask: {name}\ntag: null\n"
                                             f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
                                             f"{files}{extra}")


def offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def lm_eval_cli(model_dir: Path, tasks_dir: Path, names: list[str], out: Path, tmp_path: Path, *extra: str) -> dict:
    """lm-eval's own command line with `--model hybridlm`; its results per task."""
    script = Path(sys.executable).parent / "lm_eval"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    result = subprocess.run([*command, "--model", "hybridlm", "--model_args", f"path={model_dir},dtype=fp32", "--tasks",
                             ",".join(names), "--include_path", str(tasks_dir), "--output_path", str(out), *extra],
                            capture_output=True, text=True, env=offline_env(tmp_path), timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]


def ours(model_dir: Path, tasks: str, limit: int, *extra: str) -> dict:
    """`hybridlm eval run --json` on the shared data; its results per task."""
    result = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(model_dir), "--tasks", tasks,
                             "--limit", str(limit), "--dtype", "fp32", "--data-dir", str(SHARED_DATA), "--json", *extra],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["tasks"]
