"""Promotion gates: the checks a version must pass before an alias moves to it, from a TOML file.

```toml
[[check]]
kind = "bpb"                 # bits per byte on a text file or prepared directory
data = "valid.txt"
max_regression_pct = 1.0     # at most 1% worse than the alias's current version (absolute: max = 2.1)
[[check]]
kind = "accuracy"            # an `eval run` task
task = "mc:items.jsonl"
metric = "acc"
min = 0.3
[[check]]
kind = "safety_pass_rate"    # share of greedy replies to these prompts the built-in filter lets through
prompts = "prompts.txt"      # one prompt per line
min = 0.95
[[check]]
kind = "hashes"              # the run's files still match the registry (always checked anyway)
```

Each check is evaluated by the code `hybridlm eval` and `hybridlm serve` use (perplexity, the task
scorers, the safety filter chain); a relative path is read from the gate file's directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hybridlm.errors import UserError
from hybridlm.registry.store import Version, verify
from hybridlm.settings import load_toml


@dataclass(frozen=True)
class Check:
    kind: str
    options: dict[str, Any]
    base: Path

    def path(self, key: str) -> Path:
        path = Path(self.options[key])
        return path if path.is_absolute() else self.base / path


@dataclass(frozen=True)
class Outcome:
    kind: str
    passed: bool
    value: float | None
    detail: str

    def to_dict(self) -> dict:
        return {"check": self.kind, "passed": self.passed, "value": self.value, "detail": self.detail}


def _bpb(run_dir: Path, data: Path) -> float:
    from hybridlm.eval.perplexity import evaluate_path
    from hybridlm.run import load_run

    return evaluate_path(load_run(run_dir), data, None)["bpb"]


def check_bpb(check: Check, candidate: Version, holder: Version | None) -> Outcome:
    data = check.path("data")
    value = _bpb(candidate.run_dir, data)
    if "max" in check.options and value > check.options["max"]:
        return Outcome("bpb", False, value, f"bits per byte {value:.4f} on {data.name} is above the maximum "
                       f"{check.options['max']}")
    if "max_regression_pct" in check.options and holder is not None:
        reference = _bpb(holder.run_dir, data)
        allowed = reference * (1 + check.options["max_regression_pct"] / 100)
        if value > allowed:
            return Outcome("bpb", False, value, f"bits per byte {value:.4f} on {data.name} is more than "
                           f"{check.options['max_regression_pct']}% worse than {holder.label}'s {reference:.4f}")
        return Outcome("bpb", True, value, f"{value:.4f} vs {holder.label}'s {reference:.4f}")
    return Outcome("bpb", True, value, f"{value:.4f} on {data.name}")


def check_accuracy(check: Check, candidate: Version, holder: Version | None) -> Outcome:
    from hybridlm.eval.tasks import run_tasks
    from hybridlm.eval.tasks.base import DEFAULT_DATA_DIR, EvalOptions

    task = check.options["task"]
    if task.startswith(("mc:", "gen:")) and not Path(task.split(":", 1)[1]).is_absolute():
        task = f"{task.split(':', 1)[0]}:{check.base / task.split(':', 1)[1]}"
    metric = check.options.get("metric", "acc")
    options = EvalOptions(data_dir=DEFAULT_DATA_DIR, shots=check.options.get("shots", 0),
                          limit=check.options.get("limit"), seed=1234, stride=None, max_new_tokens=64)
    metrics = run_tasks(candidate.run_dir, [task], options, dtype="fp32")["tasks"][task]["metrics"]
    if metric not in metrics:
        raise UserError(f"gate: task {task} has no metric {metric!r} (it reports {', '.join(metrics)})")
    value, least = metrics[metric], check.options["min"]
    return Outcome("accuracy", value >= least, value, f"{metric} {value:.4f} on {Path(task).name} "
                   f"({'at least' if value >= least else 'below'} {least})")


def check_safety(check: Check, candidate: Version, holder: Version | None) -> Outcome:
    from hybridlm.inference.generate import generate_text
    from hybridlm.inference.sampling import SamplingParams
    from hybridlm.run import load_run
    from hybridlm.serve.safety import build_chain

    prompts = [line for line in check.path("prompts").read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"gate: {check.path('prompts')} holds no prompts (one per line)")
    run, chain = load_run(candidate.run_dir), build_chain([], builtin=True)
    params = SamplingParams(max_new_tokens=check.options.get("max_new_tokens", 32), temperature=0)
    passed = sum(not chain.check("".join(generate_text(run, prompt, params)), "output").blocked for prompt in prompts)
    value, least = passed / len(prompts), check.options["min"]
    return Outcome("safety_pass_rate", value >= least, value, f"{passed} of {len(prompts)} replies passed the "
                   f"output filter ({'at least' if value >= least else 'below'} {least:.0%})")


def check_hashes(check: Check, candidate: Version, holder: Version | None) -> Outcome:
    try:
        verify(candidate)
    except UserError as exc:
        return Outcome("hashes", False, None, str(exc))
    return Outcome("hashes", True, None, "the run's files match the registry")


KINDS: dict[str, tuple[Callable[[Check, Version, Version | None], Outcome], set[str], set[str]]] = {
    "bpb": (check_bpb, {"data"}, {"max", "max_regression_pct"}),
    "accuracy": (check_accuracy, {"task", "min"}, {"metric", "shots", "limit"}),
    "safety_pass_rate": (check_safety, {"prompts", "min"}, {"max_new_tokens"}),
    "hashes": (check_hashes, set(), set()),
}
"""kind -> (evaluator, required keys, optional keys)."""


def load_gate(path: Path) -> list[Check]:
    """The checks of a gate file, each validated before anything runs."""
    doc = load_toml(Path(path))
    unknown = sorted(set(doc) - {"check"})
    if unknown or not isinstance(doc.get("check"), list) or not doc["check"]:
        raise UserError(f"{path}: a gate file holds [[check]] tables only (found {', '.join(unknown) or 'none'})")
    checks = []
    for i, raw in enumerate(doc["check"]):
        kind = raw.get("kind")
        if kind not in KINDS:
            raise UserError(f"{path}: check {i + 1} has kind {kind!r}; known kinds: {', '.join(KINDS)}")
        _, required, optional = KINDS[kind]
        keys = set(raw) - {"kind"}
        if missing := sorted(required - keys):
            raise UserError(f"{path}: check {i + 1} ({kind}) needs {', '.join(missing)}")
        if extra := sorted(keys - required - optional):
            raise UserError(f"{path}: check {i + 1} ({kind}) has unknown key(s) {', '.join(extra)}; "
                            f"it takes {', '.join(sorted(required | optional)) or 'none'}")
        checks.append(Check(kind, {k: v for k, v in raw.items() if k != "kind"}, Path(path).resolve().parent))
    for check in checks:
        for key in ("data", "prompts"):
            if key in check.options and not check.path(key).exists():
                raise UserError(f"{path}: {check.kind} check: {check.path(key)} does not exist")
    return checks


def run_gate(checks: list[Check], candidate: Version, holder: Version | None) -> list[Outcome]:
    """Every check's outcome (hashes first: a changed run is not evaluated at all)."""
    outcomes = [check_hashes(Check("hashes", {}, Path(".")), candidate, holder)]
    if not outcomes[0].passed:
        return outcomes
    return outcomes + [KINDS[c.kind][0](c, candidate, holder) for c in checks if c.kind != "hashes"]
