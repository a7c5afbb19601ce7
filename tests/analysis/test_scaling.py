"""Scaling laws: the fitter recovers known parameters from synthetic losses within its own
intervals; the compute-optimal frontier against a brute-force minimum; `scaling sweep` killed
mid-point and rerun gives the losses of an uninterrupted sweep; `scaling fit` on its runs, and
its bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_MODEL, one_line_error
from e2e.test_cli import hybridlm

from hybridlm.analysis.scaling_fit import huber_fit, optimal_frontier, power_law_fit

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Chinchilla's published fit


@pytest.mark.parametrize("seed", [1, 2])
def test_the_chinchilla_fit_recovers_known_parameters_within_its_intervals(seed):
    rng = np.random.default_rng(seed)
    n = np.repeat([2e6, 5e6, 1e7, 3e7, 1e8], 5)
    d = np.tile([1e8, 3e8, 1e9, 3e9, 1e10], 5)
    losses = (TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]) * np.exp(
        rng.normal(0, 0.003, n.size))
    fit = huber_fit(n, losses, d, seed=seed, resamples=60)
    for name, value in TRUE.items():
        low, high = fit["ci95"][name]
        assert low <= value <= high, (name, value, fit["ci95"][name])
    assert fit["parameters"]["alpha"] == pytest.approx(0.34, abs=0.02)
    assert fit["optimal_size_exponent"] == pytest.approx(0.28 / 0.62, abs=0.03)


def test_kaplans_power_law_and_the_irreducible_form():
    n = np.array([1e6, 3e6, 1e7, 3e7, 1e8])
    exact = power_law_fit(n, (8.8e13 / n) ** 0.076, resamples=20)["parameters"]
    assert exact["alpha"] == pytest.approx(0.076) and exact["N_c"] == pytest.approx(8.8e13, rel=1e-6)
    fit = huber_fit(n, 2.0 + 300.0 / n**0.3, resamples=20)["parameters"]
    assert fit["E"] == pytest.approx(2.0, rel=1e-3) and fit["alpha"] == pytest.approx(0.3, rel=1e-2)


def test_the_frontier_is_the_brute_force_optimum():
    compute = np.array([1e18, 1e21])
    n_opt, d_opt = optimal_frontier(TRUE, compute)
    assert np.allclose(6 * n_opt * d_opt, compute)
    for c, best in zip(compute, n_opt):
        grid = np.geomspace(best / 100, best * 100, 200001)
        losses = TRUE["A"] / grid ** TRUE["alpha"] + TRUE["B"] / (c / 6 / grid) ** TRUE["beta"]
        assert grid[losses.argmin()] == pytest.approx(best, rel=1e-3)


def write_grid(path, data, out, sizes=((32, 1), (48, 2), (64, 2)), steps=30):
    tables = "".join(f"[[size]]\nd_model = {d}\nn_layer = {layers}\n" for d, layers in sizes)
    overrides = [*TINY_MODEL[:1], 'model.window=8', 'model.stride=8', f"data.path={data}", "data.batch_size=4",
                 "data.seq_len=32", "train.dtype=fp32", "train.log_every=1", "eval.every=0", "eval.tokens=256",
                 "checkpoint.every=5", "schedule.warmup_steps=3", "optim.lr=3e-3"]
    path.write_text(f"out = \"{out}\"\noverrides = {json.dumps(overrides)}\n{tables}[grid]\ntokens = [{steps * 4 * 32}]\n")
    return path


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}



def test_a_killed_sweep_resumes_and_its_runs_fit(tiny_shards, tmp_path, cli):
    code, out, err = cli("scaling", "sweep", str(write_grid(tmp_path / "ref.toml", tiny_shards, tmp_path / "ref")),
                         "--json")
    assert code == 0, err
    points = json.loads(out)["points"]
    assert [p["status"] for p in points] == ["trained"] * 3
    grid = write_grid(tmp_path / "grid.toml", tiny_shards, tmp_path / "sweep")
    proc = subprocess.Popen([sys.executable, "-m", "hybridlm", "scaling", "sweep", str(grid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "sweep" / points[1]["point"]
    deadline = time.time() + 180
    while not (second / "checkpoints" / "step_10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert not (second / "model.safetensors").exists() and (tmp_path / "sweep" / f"{points[1]['point']}.lock").exists()
    code, out, err = cli("scaling", "sweep", str(grid), "--json")  # the dead sweep's lock is taken over
    assert code == 0, err
    assert [p["status"] for p in json.loads(out)["points"]] == ["finished already", "trained", "trained"]
    for point in points:
        assert losses(tmp_path / "sweep" / point["point"]) == losses(tmp_path / "ref" / point["point"])
    assert not list((tmp_path / "sweep").glob("*.lock"))

    runs = [str(tmp_path / "sweep" / p["point"]) for p in points]
    code, out, err = cli("scaling", "fit", *runs, "--out", str(tmp_path / "fit"), "--json")
    assert code == 0, err
    document = json.loads(out)
    assert [r["params"] for r in document["runs"]] == sorted(r["params"] for r in document["runs"])
    assert all(r["tokens"] == 30 * 4 * 32 for r in document["runs"])
    law = document["fits"]["params"]["power_law"]
    assert law["ci95"]["alpha"][0] <= law["parameters"]["alpha"] <= law["ci95"]["alpha"][1]
    assert (tmp_path / "fit" / "scaling_fit.png").read_bytes()[:4] == b"\x89PNG"

    one_line_error(cli("scaling", "fit", runs[0], runs[0], runs[0]), "at least 3 model sizes (got 1)")
    one_line_error(cli("scaling", "fit", *runs, "--form", "chinchilla"), "two or more token budgets")
    other = tmp_path / "other"
    shutil.copytree(runs[2], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = tokenizer["added_tokens"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    one_line_error(cli("scaling", "fit", runs[0], runs[1], str(other)), "different tokenizers")
    (other / "tokenizer.json").unlink()
    one_line_error(hybridlm("scaling", "fit", runs[0], runs[1], str(other)), "tokenizer.json needed")  # a real process


@pytest.mark.parametrize(("text", "words"), [
    ("out = 'x'\n[grid]\ntokens = [100]\n", "give one or more [[size]] tables"),
    ("[[size]]\nd_model = 32\n[grid]\ntokens = [100]\nflops = [1e9]\n", "exactly one of tokens"),
    ("[[size]]\nd_model = 32\nsteps = 3\n[grid]\ntokens = [100]\n", "unknown model key(s) steps"),
    ("seed = 3\n[[size]]\nd_model = 32\n[grid]\ntokens = [100]\n", "unknown keys seed"),
    ("[[size]\n", "is not valid TOML"),
])
def test_bad_grids_are_one_line(tmp_path, text, words):
    (tmp_path / "grid.toml").write_text(text)
    result = hybridlm("scaling", "sweep", str(tmp_path / "grid.toml"))
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
