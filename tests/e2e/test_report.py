"""`hybridlm report` in a subprocess on a real two-stage recipe (clm from two sources, then sft)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from test_cli import _bad, hybridlm

from hybridlm.data.prepare import prepare
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.recipe import plan_stages, run_recipe

MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """A finished recipe: stage 1 `broad` (clm, 70/30 mixture of two prepared sources), stage 2
    `instruct` (sft on a small messages file); a few steps each, fp32, evaluations along the way."""
    root = tmp_path_factory.mktemp("report")
    texts = {"facts": [f"Fact {i}: x{i} is {i * 7 % 13}." for i in range(400)],
             "story": [f"Once the number {i} met {i + 3} and they walked {i % 5} miles." for i in range(400)]}
    tokenizer = root / "tokenizer.json"
    train_tokenizer([t for ts in texts.values() for t in ts], vocab_size=300).save(tokenizer)
    for name, lines in texts.items():
        (root / f"{name}.txt").write_text("\n\n".join(lines))
        prepare([str(root / f"{name}.txt")], tokenizer, root / "data" / name)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is x{i}?"},
                                                     {"role": "assistant", "content": f"x{i} is {i * 7 % 13}."}]})
                            + "\n" for i in range(60)))
    recipe = {"model": MODEL, "recipe": {"out": str(root / "run")}, "data": {"batch_size": 4, "seq_len": 32},
              "eval": {"every": 3, "tokens": 256}, "train": {"log_every": 2, "dtype": "fp32"},
              "checkpoint": {"every": 100}, "schedule": {"warmup_steps": 1}, "optim": {"lr": 3e-3},
              "stage": [{"name": "broad", "tokens": 128 * 6, "data": {
                         "mixture": {str(root / "data" / "facts"): 0.7, str(root / "data" / "story"): 0.3}}},
                        {"name": "instruct", "tokens": 128 * 4, "train": {"objective": "sft"},
                         "data": {"mixture": {str(chat): 1.0}}}]}
    run_recipe(plan_stages(recipe), progress=False)
    return root / "run"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_train(run_dir: Path) -> dict:
    return [r for r in records(run_dir) if "loss" in r][-1]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def copy_of(recipe_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(recipe_dir, run, ignore=shutil.ignore_patterns("report"))
    return run


def test_report_writes_plots_and_a_table_that_matches_the_metrics(recipe_dir, tmp_path):
    out = tmp_path / "report"
    result = hybridlm("report", str(recipe_dir), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    stage_dirs = [recipe_dir / "1-broad", recipe_dir / "2-instruct"]
    for name in ("loss.png", "lr.png", "tokens_by_source.png"):
        width, height = png_size(out / name)
        assert 200 < width < 5000 and 200 < height < 5000, (name, width, height)
        assert (out / name).stat().st_size > 5000
        assert str(out / name) in doc["files"].values()
    assert [s["stage"] for s in doc["stages"]] == ["broad", "instruct"]
    assert [s["objective"] for s in doc["stages"]] == ["clm", "sft"]
    markdown = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    for stage, run_dir in zip(doc["stages"], stage_dirs):
        last = last_train(run_dir)
        assert stage["tokens"] == last["tokens"] and stage["steps"] == last["step"] and stage["finished"]
        assert stage["tokens_by_source"] == last["tokens_by_source"]
        assert stage["train_loss"] == pytest.approx(last["loss"])
        assert stage["seconds"] == pytest.approx(last["train_s"])  # one segment: no resume; evaluations excluded
        row = rows[stage["stage"]]
        assert f"| {last['loss']:.4f} |" in row and row.rstrip().endswith("| yes |")
        val = [r for r in records(run_dir) if "val_loss" in r][-1]
        assert stage["val_loss"] == pytest.approx(val["val_loss"]) and f"| {val['val_loss']:.4f} |" in row
    assert "val_bpb" in doc["stages"][0] and "val_bpb" not in doc["stages"][1]  # bpb is clm-only
    shares = doc["stages"][0]["tokens_by_source"]
    assert shares[str(recipe_dir.parent / "data" / "facts")] > shares[str(recipe_dir.parent / "data" / "story")]
    for link in ("(loss.png)", "(lr.png)", "(tokens_by_source.png)", "## Tokens per source", "`"):
        assert link in markdown


def test_unfinished_stage_and_a_cut_off_last_line_are_reported(recipe_dir, tmp_path):
    run = copy_of(recipe_dir, tmp_path)
    (run / "2-instruct" / "model.safetensors").unlink()
    metrics = run / "2-instruct" / "metrics.jsonl"
    complete = last_train(metrics.parent)
    metrics.write_text(metrics.read_text() + '{"step": 99, "loss": 1.5, "tok')  # killed mid-write
    result = hybridlm("report", str(run))
    assert result.returncode == 0, result.stderr
    assert "unfinished" in result.stdout and "Traceback" not in result.stderr
    markdown = (run / "report" / "report.md").read_text()
    (row,) = [line for line in markdown.splitlines() if line.startswith("| instruct ")]
    assert "no (unfinished)" in row and f"| {complete['loss']:.4f} |" in row
    for name in ("loss.png", "lr.png", "tokens_by_source.png"):
        assert png_size(run / "report" / name)[0] > 0
    single = hybridlm("report", str(run / "2-instruct"), "--json")  # one run directory on its own
    assert single.returncode == 0, single.stderr
    (stage,) = json.loads(single.stdout)["stages"]
    assert not stage["finished"] and stage["tokens"] == complete["tokens"]


def test_bad_runs_get_one_line_and_exit_2(recipe_dir, tmp_path, cli):
    _bad(hybridlm("report", str(tmp_path / "missing")), "not found")
    (tmp_path / "empty").mkdir()
    _bad(cli("report", str(tmp_path / "empty")), "neither a run directory")
    run = copy_of(recipe_dir, tmp_path)
    (run / "1-broad" / "metrics.jsonl").write_text("")
    _bad(cli("report", str(run / "1-broad")), "no training records")
    (run / "2-instruct" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    _bad(cli("report", str(run / "2-instruct")), "line 2 is not a metrics record")
