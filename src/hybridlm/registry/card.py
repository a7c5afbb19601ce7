"""Model cards: README.md with Hugging Face model-card metadata and a body a person reads.

The metadata block is the YAML the Hub validates (license, library_name, datasets, base_model,
pipeline_tag, and `model-index` with the evaluation results); it is written as JSON, which is
YAML too, so no YAML writer is needed. Everything comes from the run directory (config, lineage,
metrics.jsonl, and its stages through `parent_run`) plus the `eval run` results given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hybridlm.fileio import read_json
from hybridlm.train.metrics import read_metrics

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def stages(run_dir: Path) -> list[dict]:
    """The run and the runs it started from (parent_run in lineage.json), first stage first."""
    found, seen, current = [], set(), Path(run_dir)
    while current and (current / "config.json").is_file() and current.resolve() not in seen:
        seen.add(current.resolve())
        config = read_json(current / "config.json", "run config")
        lineage = read_json(current / "lineage.json", "lineage") if (current / "lineage.json").is_file() else {}
        last_val = next((r for r in reversed(read_metrics(current / "metrics.jsonl"))
                         if any(k.startswith("val_") and isinstance(v, float) for k, v in r.items())), {})
        found.append({"name": current.name, "objective": config["train"]["objective"],
                      "steps": config["train"]["steps"], "sources": [s.get("spec") for s in lineage.get("sources", [])],
                      "val": {k: v for k, v in last_val.items() if k.startswith("val_") and isinstance(v, float)}})
        parent = lineage.get("parent_run")
        current = Path(parent) if parent else None
    return found[::-1]


def _model_index(name: str, chain: list[dict], evals: list[dict]) -> list[dict]:
    results = []
    last = chain[-1] if chain else {}
    if "val_bpb" in last.get("val", {}):
        results.append({"task": {"type": "text-generation", "name": "Language modelling (held-out)"},
                        "dataset": {"name": ", ".join(last["sources"]) or "held-out", "type": "held-out"},
                        "metrics": [{"type": "bits_per_byte", "value": round(last["val"]["val_bpb"], 4),
                                     "name": "Validation bits per byte"}]})
    for doc in evals:
        for task, result in doc.get("tasks", {}).items():
            metrics = [{"type": key, "value": round(value, 4), "name": key}
                       for key, value in result.get("metrics", {}).items() if isinstance(value, int | float)]
            if metrics:
                results.append({"task": {"type": "text-generation", "name": task},
                                "dataset": {"name": task, "type": task.split(":", 1)[0]}, "metrics": metrics})
    return [{"name": name, "results": results}]


def render_card(run_dir: Path, name: str, *, evals: list[dict] | None = None, license: str = "other",
                version: str = "") -> str:
    """README.md for the run at `run_dir`, called `name` (with its registry version, when it has one)."""
    run_dir, evals = Path(run_dir), evals or []
    chain = stages(run_dir)
    config = read_json(run_dir / "config.json", "run config")
    parents = [str(p) for p in [read_json(run_dir / "lineage.json", "lineage").get("parent_run")]
               if p] if (run_dir / "lineage.json").is_file() else []
    meta = {"license": license, "library_name": "hybridlm", "pipeline_tag": "text-generation",
            "tags": ["hybridlm", "hybrid-attention"],
            "datasets": sorted({s for stage in chain for s in stage["sources"] if s}),
            "model-index": _model_index(name, chain, evals)}
    if hub_parents := [p for p in parents if _HUB_ID.match(p) and not Path(p).exists()]:
        meta["base_model"] = hub_parents
    model = config["model"]
    lines = ["---", json.dumps(meta, indent=2), "---", "", f"# {name}{f' (version {version})' if version else ''}", "",
             f"A hybrid-attention language model trained with hybridlm: {model['n_layer']} layers "
             f"(pattern `{model['layer_pattern']}`, D = dense causal, S = sparse: window {model['window']}, "
             f"stride {model['stride']}, {model['n_global']} global slots), d_model {model['d_model']}, "
             f"context {model['max_seq_len']}, vocabulary {model['vocab_size']}.", "",
             "## Intended use", "",
             "Research and experiments at small scale: text continuation and, after instruction tuning, short "
             "answers in the chat template. Not for decisions about people, and not as a source of facts.", "",
             "## Training stages and data", "", "| stage | objective | steps | data | held-out loss | bits/byte |",
             "|---|---|---|---|---|---|"]
    for stage in chain:
        val = stage["val"]
        lines.append(f"| {stage['name']} | {stage['objective']} | {stage['steps']:,} | "
                     f"{', '.join(f'`{s}`' for s in stage['sources']) or '-'} | {_fmt(val.get('val_loss'))} | "
                     f"{_fmt(val.get('val_bpb'))} |")
    lines += ["", "## Evaluation", ""]
    table = [(task, key, value) for doc in evals for task, result in doc.get("tasks", {}).items()
             for key, value in result.get("metrics", {}).items() if isinstance(value, int | float)]
    lines += (["| task | metric | value |", "|---|---|---|"] + [f"| {t} | {k} | {_fmt(v)} |" for t, k, v in table]
              if table else ["No benchmark results were given at registration (`hybridlm eval run --json`)."])
    lines += ["", "## Limitations", "",
              "Trained on little data on one machine: expect fluent-looking text that is often wrong. The safety "
              "filter of `hybridlm serve` screens prompts and replies; the model itself was not aligned.", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def card_metadata(text: str) -> dict:
    """The metadata block of a card written by render_card."""
    _, block, _ = text.split("---\n", 2)
    return json.loads(block)
