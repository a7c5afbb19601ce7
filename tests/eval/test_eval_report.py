"""`hybridlm eval report` in a subprocess: two real efficiency results of the tiny run (bf16/auto
and fp32) plus two hand-written `eval run` results in the documented shape, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e.test_cli import _bad, hybridlm
from matplotlib.image import imread

from hybridlm.eval.compare import model_labels
from hybridlm.eval.efficiency import format_value


def _run_result(model: str, acc: float, acc_norm: float, ppl: float) -> dict:
    """An `eval run --json` document as documented: metrics, items and (some) stderr per task."""
    return {"model": model, "seed": 1234, "shots": 0, "limit": 50, "tasks": {
        "hellaswag": {"metrics": {"acc": acc, "acc_norm": acc_norm}, "n": 50,
                      "stderr": {"acc": 0.0612, "acc_norm": 0.0598}},
        "lambada": {"metrics": {"acc": acc / 2, "ppl": ppl}, "n": 50, "stderr": {"acc": 0.0401}}}}


HYBRID = _run_result("/runs/wikitext2/hybrid/run", 0.3125, 0.3750, 812.5)
DENSE = _run_result("/runs/wikitext2/dense/run", 0.2875, 0.3000, 905.25)


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_report")
    files = {}
    for name, extra in (("eff-auto", []), ("eff-fp32", ["--dtype", "fp32"])):
        done = hybridlm("eval", "efficiency", "--model", str(tiny_run), "--prompt-tokens", "32", "--new-tokens", "8",
                        "--repeats", "1", "--json", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        files[name] = root / f"{name}.json"
        files[name].write_text(done.stdout)
    for name, doc in (("hybrid", HYBRID), ("dense", DENSE)):
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(doc))
    return files


def test_report_has_every_model_and_metric_and_real_pngs(results, tiny_run, tmp_path):
    out = tmp_path / "report"
    done = hybridlm("eval", "report", *map(str, results.values()), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    tiny = f"{tiny_run.parent.name}/run"  # all three runs are called `run`: parents tell them apart
    assert tiny_run.name == "run"
    assert summary["models"] == [f"{tiny} [eff-auto]", f"{tiny} [eff-fp32]", "hybrid/run", "dense/run"]
    for name in ("tasks", "efficiency"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(out / f"{name}.png").shape  # decodes: a real image, not just a header
        assert width > 300 and height > 200
    markdown = (out / "report.md").read_text()
    for model in summary["models"]:
        assert model in markdown
    for doc in (HYBRID, DENSE):
        for task in doc["tasks"].values():
            for metric, value in task["metrics"].items():
                stderr = task["stderr"].get(metric)
                assert f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "") in markdown, (metric, value)
    for name in ("eff-auto", "eff-fp32"):
        fields = json.loads(results[name].read_text())["efficiency"]
        for item in fields.values():
            assert format_value(item["value"], item["unit"]) in markdown
        assert fields["energy_per_token"]["method"] in markdown
    assert "| hellaswag | items | 50 | 50 |" in markdown and "shots 0, seed 1234, limit 50" in markdown


def test_a_report_of_one_kind_draws_only_its_chart(results, tmp_path):
    done = hybridlm("eval", "report", str(results["hybrid"]), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "tasks.png").is_file() and not (tmp_path / "r" / "efficiency.png").exists()
    assert "## Efficiency" not in (tmp_path / "r" / "report.md").read_text()


def test_model_names_are_run_directories_told_apart_by_their_parents():
    assert model_labels(["/a/x/run", "/b/x/run", "runs/dense", "/c/run/"]) == {
        "/a/x/run": "a/x/run", "/b/x/run": "b/x/run", "runs/dense": "dense", "/c/run/": "c/run"}


def test_bad_inputs_get_one_line_and_exit_2(results, tmp_path):
    out = str(tmp_path / "out")
    not_json = tmp_path / "notes.json"
    not_json.write_text("acc 0.31\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 2.0}))
    no_metrics = tmp_path / "no_metrics.json"
    no_metrics.write_text(json.dumps({"model": "r", "tasks": {"piqa": {"acc": 0.5}}}))
    bad_field = tmp_path / "bad_field.json"
    bad_field.write_text(json.dumps({"model": "r", "efficiency": {"params": 12}}))
    _bad(hybridlm("eval", "report", "--out", out), "no results files given")
    _bad(hybridlm("eval", "report", str(not_json), "--out", out), f"results file at {not_json} is not valid JSON")
    _bad(hybridlm("eval", "report", str(results["hybrid"]), str(other), "--out", out),
         f"{other} is neither `hybridlm eval run --json` output")
    _bad(hybridlm("eval", "report", str(no_metrics), "--out", out), 'tasks.piqa has no "metrics" object; expected')
    _bad(hybridlm("eval", "report", str(bad_field), "--out", out), "efficiency.params is not {\"value\": number")
    _bad(hybridlm("eval", "report", str(tmp_path / "missing.json"), "--out", out), "missing.json is not a file")
    _bad(hybridlm("eval", "report", str(results["hybrid"]), "--out", str(not_json)), "is a file; give a directory")
    assert not Path(out).exists()
