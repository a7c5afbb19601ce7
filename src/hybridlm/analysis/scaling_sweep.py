"""`hybridlm scaling sweep GRID.toml`: train every (model size, token budget) point of a grid, each
as an ordinary run directory, so `scaling fit` can read them.

    out = "sweep"                       # under the grid file's folder unless absolute
    overrides = ["data.path=data/shards", "data.seq_len=256", "data.batch_size=8"]
    [[size]]                            # one table per model size: model.* fields
    n_layer = 2
    d_model = 64
    [grid]
    tokens = [204800, 409600]           # a plain grid: every size at every budget
    # flops = [1e12, 3e12]              # or an IsoFLOP grid: tokens = flops / (6 N) per size

Resumable: a finished point is skipped and a killed one resumes from its last checkpoint.
Parallel-safe: a point is claimed by creating POINT.lock exclusively (holding the pid), so several
sweep processes share one grid; a lock whose process has died is taken over.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.model.info import count_params
from hybridlm.train.checkpoint import checkpoint_dirs
from hybridlm.train.config import RunConfig, load_run_config
from hybridlm.train.recipe import run_finished
from hybridlm.train.trainer import train

GRID_KEYS = {"out", "overrides", "size", "grid"}


def read_grid(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file not found: {path}")
    try:
        grid = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc})") from None
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown keys {', '.join(unknown)}; a grid has {', '.join(sorted(GRID_KEYS))}")
    sizes, axes = grid.get("size", []), grid.get("grid", {})
    if not isinstance(sizes, list) or not sizes or not all(isinstance(s, dict) and s for s in sizes):
        raise UserError(f"{path}: give one or more [[size]] tables of model fields")
    if sorted(axes) not in (["tokens"], ["flops"]) or not axes[next(iter(axes))]:
        raise UserError(f"{path}: [grid] needs exactly one of tokens = [...] (a plain grid) or flops = [...] (IsoFLOP)")
    out = Path(grid.get("out", "sweep"))
    return {"out": out if out.is_absolute() else path.parent / out, "overrides": list(grid.get("overrides", [])),
            "sizes": sizes, "axes": axes}


def plan_points(grid: dict) -> list[tuple[str, RunConfig]]:
    """(point name, its run config) for every point; configs validated before anything trains."""
    points = []
    for index, size in enumerate(grid["sizes"]):
        model = [f"model.{key}={value!r}" if isinstance(value, str) else f"model.{key}={value}"
                 for key, value in size.items()]
        probe = load_run_config(None, grid["overrides"] + model)
        per_step = probe.data.batch_size * probe.data.seq_len
        params = count_params(probe.model)[0]
        (axis, values), = grid["axes"].items()
        for value in values:
            tokens = int(value) if axis == "tokens" else int(value / (6 * params))
            steps = max(1, math.ceil(tokens / per_step))
            name = f"s{index}-{params}p-{steps * per_step}t"
            out = grid["out"] / name
            points.append((name, load_run_config(None, grid["overrides"] + model + [f"train.steps={steps}",
                                                                                     f"train.out={out}"])))
    return points


def _claim(lock: Path) -> bool:
    """Create the lock exclusively; take it over if the process holding it has died."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or "0")
                os.kill(holder, 0)
                return False  # alive: another sweep trains it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def run_sweep(path: Path, *, progress: bool = True) -> list[dict]:
    grid = read_grid(path)
    points = plan_points(grid)
    grid["out"].mkdir(parents=True, exist_ok=True)
    results = []
    for name, cfg in points:
        out = Path(cfg.train.out)
        if run_finished(out):
            results.append({"point": name, "run_dir": str(out), "status": "finished already"})
            continue
        lock = grid["out"] / f"{name}.lock"
        if not _claim(lock):
            results.append({"point": name, "run_dir": str(out), "status": "running in another sweep"})
            continue
        try:
            summary = train(cfg, resume=bool(checkpoint_dirs(out)), progress=progress)
        finally:
            lock.unlink(missing_ok=True)
        results.append({"point": name, "run_dir": str(out), "status": "trained", "val_loss": summary.get("val_loss")})
    return results
