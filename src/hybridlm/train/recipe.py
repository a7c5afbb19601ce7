"""Multi-stage training recipes: stages run in order, each starting from the previous one's weights.

A recipe is TOML (or the same dict built in code): a run config whose sections hold what every
stage shares, plus [recipe] and one [[stage]] table per stage with its own section keys:

    [model]                      # one model for every stage
    preset = "small"
    [recipe]
    out = "runs/paper-3stage"    # stage i writes its run directory to out/<i>-<name>
    total_tokens = 1_000_000     # what stage fractions are fractions of
    init_from = ""               # a finished run the first stage starts from (default: fresh weights)
    [data]                       # any section of the run config (train/config.py), shared by all stages
    batch_size = 16
    [[stage]]
    name = "broad"
    fraction = 0.8               # or tokens = 800_000
    train.objective = "clm"      # clm, mlm or sft
    data.mixture = { "data/docs" = 1.0 }
    optim.lr = 3e-4              # any other section.key; it overrides the shared value
    fresh_optimizer = true       # false: carry AdamW moments over from the previous stage
    parent = "sft"               # start from this earlier stage instead of the previous one
    rl.reward_model = "stage:rm" # any "stage:NAME" value is that stage's run directory

A stage whose final model exists is skipped, one with checkpoints resumes, so rerunning a killed
recipe continues where it stopped; `only` reruns one stage from scratch. Built-in recipes (package
data, e.g. `paper-3stage`) are named without a path.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tomllib
from importlib.resources import files
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import read_json
from hybridlm.run import final_weights, verify_manifest
from hybridlm.settings import apply_overrides, load_toml
from hybridlm.train.config import MOVED, SECTIONS, RunConfig, run_config_from_dict
from hybridlm.train.checkpoint import checkpoint_dirs
from hybridlm.train.distributed import barrier, init_world
from hybridlm.train.metrics import read_metrics
from hybridlm.train.schedule import batch_schedule
from hybridlm.train.stage_data import check_sources
from hybridlm.train.tracking import MlflowRun
from hybridlm.train.trainer import train

STAGE_KEYS = ("name", "fraction", "tokens", "fresh_optimizer", "parent")
STAGE_REF = "stage:"
BUILTIN = files("hybridlm") / "recipes"


@dataclasses.dataclass
class Stage:
    name: str
    run: RunConfig


def recipe_document(name_or_path: str | Path) -> dict:
    """The TOML of a recipe file, or of the built-in recipe of that name (`paper-3stage`)."""
    path = Path(name_or_path)
    if path.exists():
        return load_toml(path)
    builtin = BUILTIN / f"{name_or_path}.toml"
    if path.suffix != ".toml" and builtin.is_file():
        return tomllib.loads(builtin.read_text(encoding="utf-8"))
    names = sorted(f.name.removesuffix(".toml") for f in BUILTIN.iterdir() if f.name.endswith(".toml"))
    raise UserError(f"recipe {name_or_path} not found: give a TOML file or a built-in recipe ({', '.join(names)})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> list[Stage]:
    return plan_stages(apply_overrides(recipe_document(path), overrides or []))


def plan_stages(doc: dict) -> list[Stage]:
    """Resolve every stage's full run config (steps from its token budget); errors before training."""
    recipe = dict(doc.get("recipe", {}))
    if "train" in recipe:
        raise UserError("[recipe.train] is gone: put settings every stage shares in their own sections "
                        "([data], [optim], [schedule], [eval], ...) at the top of the recipe")
    unknown = sorted(set(doc) - {"model", "recipe", "stage", *SECTIONS})
    if unknown:
        raise UserError(f"unknown recipe section(s) {', '.join(unknown)}; known: model, recipe, "
                        f"{', '.join(SECTIONS)}, [[stage]]")
    stages = doc.get("stage", [])
    if not isinstance(stages, list) or not stages:
        raise UserError("the recipe has no [[stage]] tables; add at least one")
    out = Path(recipe.get("out", "runs/recipe"))
    total = recipe.get("total_tokens", 0)
    names = [s.get("name") for s in stages]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise UserError("every [[stage]] needs a unique, non-empty name")
    planned, previous, outs = [], recipe.get("init_from", ""), {}
    if previous and not isinstance(previous, str):
        raise UserError("[recipe] init_from must be the path of a finished run directory")
    for index, raw in enumerate(stages, start=1):
        stage_out = out / f"{index}-{raw['name']}"
        sections = _resolve_stage_refs(_stage_sections(doc, raw), outs, raw["name"])
        parent = raw.get("parent")
        if parent is not None and parent not in outs:
            raise UserError(f"stage {raw['name']!r}: parent {parent!r} is not an earlier stage "
                            f"({', '.join(outs) or 'there is none'})")
        sections["train"].update(out=str(stage_out), init_from=outs[parent] if parent else previous)
        if not raw.get("fresh_optimizer", True):
            sections["train"]["init_optimizer"] = True
        run = run_config_from_dict({"model": doc.get("model", {}), **sections})
        planned.append(Stage(raw["name"], run.replace(train={"steps": _steps(raw, total, run)})))
        previous = outs[raw["name"]] = str(stage_out)
    return planned


def _resolve_stage_refs(sections: dict[str, dict], outs: dict[str, str], stage: str) -> dict[str, dict]:
    """Every "stage:NAME" value replaced by that earlier stage's run directory."""
    for section in sections.values():
        for key, value in section.items():
            if isinstance(value, str) and value.startswith(STAGE_REF):
                name = value[len(STAGE_REF):]
                if name not in outs:
                    raise UserError(f"stage {stage!r}: {value!r} names no earlier stage ({', '.join(outs) or 'none'})")
                section[key] = outs[name]
    return sections


def _stage_sections(doc: dict, raw: dict) -> dict[str, dict]:
    """Every section for one stage: the recipe's shared values, then the stage's own."""
    loose = sorted(k for k in raw if k not in STAGE_KEYS and not isinstance(raw[k], dict))
    if loose:
        hints = [f"{k} (write {'.'.join(MOVED[k])})" if k in MOVED else k for k in loose]
        raise UserError(f"stage {raw['name']!r}: {', '.join(hints)} must sit in a section, e.g. optim.lr = 3e-4")
    unknown = sorted(k for k in raw if k not in STAGE_KEYS and k not in SECTIONS)
    if unknown:
        raise UserError(f"stage {raw['name']!r}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return {name: {**doc.get(name, {}), **raw.get(name, {})} for name in SECTIONS}


def _steps(raw: dict, total: int, cfg: RunConfig) -> int:
    if ("tokens" in raw) == ("fraction" in raw):
        raise UserError(f"stage {raw['name']!r}: give exactly one budget, tokens or fraction")
    if "fraction" in raw:
        if not isinstance(total, int) or total <= 0:
            raise UserError("stage fractions need [recipe] total_tokens > 0")
        if not 0 < raw["fraction"] <= 1:
            raise UserError(f"stage {raw['name']!r}: fraction must be in (0, 1] (got {raw['fraction']})")
        tokens = raw["fraction"] * total
    else:
        tokens = raw["tokens"]
        if not isinstance(tokens, int) or tokens <= 0:
            raise UserError(f"stage {raw['name']!r}: tokens must be a positive integer")
    return batch_schedule(cfg).steps_for_tokens(math.ceil(tokens))


def run_recipe(stages: list[Stage], *, only: str | None = None, progress: bool = True) -> list[dict]:
    """Train the stages in order (or just `only`); return one summary per stage run or found done."""
    if only is not None and only not in [s.name for s in stages]:
        raise UserError(f"no stage named {only!r}; the recipe has {', '.join(s.name for s in stages)}")
    chosen = [s for s in stages if only is None or s.name == only]
    for stage in chosen:
        if not run_finished(Path(stage.run.train.out)) or only is not None:
            check_sources(stage.run)
    parent = _recipe_tracking(chosen)
    summaries = []
    for stage in chosen:
        out = Path(stage.run.train.out)
        if only is not None:
            if stage.run.train.init_from and not run_finished(Path(stage.run.train.init_from)):
                raise UserError(f"stage {only!r} starts from {stage.run.train.init_from}, which has not finished; "
                                "run the recipe up to it first")
            world = init_world()
            if world.is_main:
                shutil.rmtree(out, ignore_errors=True)
            barrier(world)
        if run_finished(out):
            summaries.append({"stage": stage.name, "skipped": True, **_last_summary(out)})
            continue
        result = train(stage.run, resume=bool(checkpoint_dirs(out)), progress=progress,
                       tracking_parent=parent.run_id if parent else None)
        summaries.append({"stage": stage.name, "objective": stage.run.train.objective, **result})
    if parent is not None:
        parent.log_report(Path(chosen[0].run.train.out).parent)
        parent.finish()
    return summaries


def _recipe_tracking(stages: list[Stage]) -> MlflowRun | None:
    """The recipe's parent MLflow run (its stages log as children), when its stages are tracked."""
    first = stages[0].run.train
    if not first.tracking or not init_world().is_main:
        return None
    return MlflowRun.open(Path(first.out).parent, first.tracking_uri, first.experiment)


def run_finished(run_dir: Path) -> bool:
    """A finished run: its model written and its files matching the manifest."""
    if final_weights(run_dir) is None:
        return False
    try:
        verify_manifest(run_dir)
        return True
    except UserError:
        return False


def _last_summary(run_dir: Path) -> dict:
    """The last validation record of a finished stage, from its metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    val = next((r for r in reversed(records) if any(k.startswith("val_") for k in r)), {})
    config = read_json(run_dir / "config.json", "run config")
    return {"run_dir": str(run_dir), "steps": config["train"]["steps"], **val}
