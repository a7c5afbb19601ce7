"""`hybridlm eval efficiency` on a real trained tiny run (in a subprocess), and its energy and
training-cost sources on hand-made inputs (a fake RAPL tree, hand-written metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e.test_cli import _bad, hybridlm

from hybridlm.config import ModelConfig
from hybridlm.device import cpu_model
from hybridlm.eval.efficiency import (
    FIELDS,
    EnergyMeter,
    format_value,
    rapl_counters,
    rapl_joules,
    training_cost,
)
from hybridlm.model.cpu_kernels import kernel_path
from hybridlm.model.info import model_info

UNITS = {"params": "params", "flops_per_token": "FLOP/token", "training_time": "s", "tokens_seen": "tokens",
         "prefill_tokens_per_s": "tokens/s", "decode_tokens_per_s": "tokens/s", "time_to_first_token": "s",
         "peak_memory": "B", "size_on_disk": "B", "energy_per_token": "J/token"}


@pytest.fixture(scope="module")
def report(tiny_run) -> dict:
    result = hybridlm("eval", "efficiency", "--model", str(tiny_run), "--prompt-tokens", "64", "--new-tokens", "32",
                      "--repeats", "2", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_every_field_is_positive_with_its_unit_and_method(report, tiny_run):
    fields = report["efficiency"]
    assert list(fields) == list(FIELDS)
    for key, item in fields.items():
        assert item["unit"] == UNITS[key] and item["method"], key
        assert isinstance(item["value"], (int, float)) and item["value"] > 0, (key, item)
    assert report["prompt_tokens"] == 64 and report["new_tokens"] == 32 and report["repeats"] == 2
    assert report["dtype"] in ("bf16", "fp32") and report["device"] == "cpu"
    assert report["machine"]["kernel_path"] == kernel_path() and report["machine"]["cpu"] == cpu_model()


def test_figures_match_their_sources(report, tiny_run):
    fields = report["efficiency"]
    info = model_info(ModelConfig(**json.loads((tiny_run / "config.json").read_text())["model"]))
    assert fields["params"]["value"] == info["params"]
    assert fields["flops_per_token"]["value"] == pytest.approx(info["flops_per_token"])
    assert fields["size_on_disk"]["value"] == (tiny_run / "model.safetensors").stat().st_size
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "loss" in r][-1]
    assert fields["tokens_seen"]["value"] == last["tokens"] == 40 * 8 * 64
    assert fields["training_time"]["value"] <= last["elapsed_s"]
    assert fields["peak_memory"]["value"] > fields["size_on_disk"]["value"]  # the weights are resident
    assert fields["energy_per_token"]["method"].startswith(("measured (RAPL)", "estimate: "))


def test_human_output_is_one_aligned_table(tiny_run):
    result = hybridlm("eval", "efficiency", "--model", str(tiny_run), "--prompt-tokens", "16", "--new-tokens", "8",
                      "--repeats", "1", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    head, *rows = result.stdout.strip().splitlines()
    assert "fp32" in head and "16-token prompt + 8 new tokens" in head
    assert [row.split("  ")[0] for row in rows] == list(FIELDS.values())
    method_starts = {len(row) - len(row.split("  ")[-1]) for row in rows}
    assert len(method_starts) == 1, result.stdout  # labels padded, values right-aligned: one column edge
    assert "estimate: " in rows[-1] or "measured (RAPL)" in rows[-1]


def test_bad_inputs_get_one_line_and_exit_2(tiny_run, tmp_path, cli):
    _bad(cli("eval", "efficiency", "--model", str(tmp_path)), "not a hybridlm run directory")
    _bad(cli("eval", "efficiency", "--model", str(tiny_run), "--prompt-tokens", "250", "--new-tokens", "10"),
         "exceed the model's context (256)")
    _bad(cli("eval", "efficiency", "--model", str(tiny_run), "--new-tokens", "1"), "--new-tokens >= 2")
    _bad(cli("eval", "efficiency", "--model", str(tiny_run), "--repeats", "0"), "--repeats must be >= 1")


def _domain(root: Path, name: str, energy: str, span: int = 1000) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "energy_uj").write_text(energy)
    (root / name / "max_energy_range_uj").write_text(str(span))


def test_rapl_packages_only_and_wrap_around(tmp_path):
    _domain(tmp_path, "intel-rapl:0", "990")
    _domain(tmp_path, "intel-rapl:0:0", "5")  # a sub-domain inside package 0: not counted again
    _domain(tmp_path, "intel-rapl:1", "100")
    before = rapl_counters(tmp_path)
    assert before == [(990, 1000), (100, 1000)]
    _domain(tmp_path, "intel-rapl:0", "10")  # wrapped past 1000
    _domain(tmp_path, "intel-rapl:1", "400")
    assert rapl_joules(before, rapl_counters(tmp_path)) == pytest.approx((20 + 300) / 1e6)


def test_energy_is_measured_from_rapl_else_an_estimate_that_says_why(tmp_path):
    _domain(tmp_path, "intel-rapl:0", "0", span=10**12)
    meter = EnergyMeter(tmp_path)
    meter.start()
    _domain(tmp_path, "intel-rapl:0", "2000000", span=10**12)  # 2 J
    measured = meter.per_token(4)
    assert measured == {"value": 0.5, "unit": "J/token", "method": measured["method"]}
    assert measured["method"].startswith("measured (RAPL)")
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir()  # unreadable, as root-only counters are to users
    for root in (tmp_path, tmp_path / "absent"):
        meter = EnergyMeter(root)
        meter.start()
        sum(i * i for i in range(200_000))
        estimate = meter.per_token(10)
        assert estimate["value"] > 0 and estimate["unit"] == "J/token"
        assert estimate["method"].startswith("estimate: ") and "W per core" in estimate["method"]
        assert ("not readable" if root == tmp_path else "no RAPL package domains") in estimate["method"]


def _run(path: Path, tokens: int, seconds: float, parent: Path | None) -> Path:
    path.mkdir(parents=True)
    records = [{"step": 1, "loss": 3.0, "tokens": tokens // 2, "tok_s": tokens / seconds, "train_s": seconds / 2},
               {"step": 2, "val_loss": 3.0},
               {"step": 2, "loss": 2.0, "tokens": tokens, "tok_s": tokens / seconds, "train_s": seconds}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "lineage.json").write_text(json.dumps({"parent_run": str(parent) if parent else None}))
    return path


def test_training_cost_sums_the_runs_a_model_was_trained_from(tmp_path):
    broad = _run(tmp_path / "1-broad", 1000, 10.0, None)
    # recorded relative to another working directory: found as the sibling stage directory
    instruct = _run(tmp_path / "2-instruct", 200, 4.0, Path("elsewhere/1-broad"))
    seconds, tokens = training_cost(instruct)
    assert seconds["value"] == pytest.approx(14.0) and tokens["value"] == 1200
    assert "2 runs (1-broad, 2-instruct)" in seconds["method"]
    assert training_cost(broad)[1]["value"] == 1000
    untrained = training_cost(tmp_path)[0]
    assert untrained["value"] is None and "no training records" in untrained["method"]


def test_values_are_printed_in_readable_units():
    assert format_value(3 * 2**20, "B") == "3 MiB"
    assert format_value(1234.56, "tokens/s") == "1,234.6 tokens/s"
    assert format_value(0.0123, "s") == "12.3 ms"
    assert format_value(1234567, "params") == "1,234,567 params"
    assert format_value(1.5e10, "FLOP/token") == "1.5e+10 FLOP/token"
    assert format_value(None, "s") == "—"
