"""The CLI end to end in real subprocesses: the tiny quickstart, generation, evaluation, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error as _bad
from conftest import shared_file

from hybridlm.model.cpu_kernels import machine


def hybridlm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridlm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("qs") / "quick"
    result = hybridlm("quickstart", "--preset", "tiny", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_quickstart_tiny_runs_three_stages_and_beats_the_unigram_baseline(quickstart):
    for key in ("run_dir", "params", "train_tokens", "seconds", "val_bpb", "unigram_bpb", "sample", "stages"):
        assert key in quickstart
    assert quickstart["val_bpb"] < quickstart["unigram_bpb"]
    assert [s["stage"] for s in quickstart["stages"]] == ["broad", "focused", "instruct"]
    assert [s["objective"] for s in quickstart["stages"]] == ["clm", "clm", "sft"]
    assert sum(s["train_tokens"] for s in quickstart["stages"]) == quickstart["train_tokens"]
    run = Path(quickstart["run_dir"])
    assert run.name == "3-instruct"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "metrics.jsonl",
                 "lineage.json"):
        assert (run / name).is_file(), name
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["parent_run"].endswith("2-focused") and lineage["sources"][0]["spec"] == "stdlib-docs:qa"
    focused = json.loads((run.parent / "2-focused" / "lineage.json").read_text())
    assert focused["parent_run"].endswith("1-broad")
    drawn = {Path(s["spec"]).name: s["tokens_drawn"] for s in focused["sources"]}
    assert abs(drawn["reference"] / sum(drawn.values()) - 0.7) < 0.01  # the 70/30 mixture, realised
    prepared = json.loads((run.parent / "1-broad" / "lineage.json").read_text())["sources"][0]["sources"][0]
    assert prepared["spec"] == "stdlib-docs:docstrings" and len(prepared["sha256"]) == 64
    assert quickstart["sample"] and "\ufffd" not in quickstart["sample"]


def test_generate_is_seeded_streams_and_stops(quickstart):
    run = quickstart["run_dir"]
    args = ("generate", "--model", run, "--prompt", "The value", "--seed", "3", "--max-new-tokens", "40", "--json")
    first, second = hybridlm(*args), hybridlm(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]
    text = json.loads(first.stdout)["text"]
    stop = text.strip()[:3]
    stopped = hybridlm(*args, "--stop", stop)
    assert stop not in json.loads(stopped.stdout)["text"]
    plain = hybridlm("generate", "--model", run, "--prompt", "The value", "--seed", "3", "--max-new-tokens", "40")
    assert plain.stdout.rstrip("\n") == "The value" + text


def test_eval_perplexity_on_a_text_file(quickstart, tmp_path):
    path = tmp_path / "shakespeare.txt"  # the first 80,000 characters: many windows, a few seconds
    path.write_text(shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:80_000], encoding="utf-8")
    result = hybridlm("eval", "perplexity", "--model", quickstart["run_dir"], "--data", str(path), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["bytes"] == path.stat().st_size
    assert metrics["tokens"] > 20_000 and metrics["bpb"] > 0 and metrics["ppl"] > 1


def test_model_info_json():
    result = hybridlm("model", "info", "--preset", "small", "--context", "8192", "--json")
    info = json.loads(result.stdout)
    assert {"params", "flops_per_token", "kv_cache_bytes", "kv_cache_bytes_dense"} <= info.keys()
    assert info["kv_cache_bytes"] * 2 < info["kv_cache_bytes_dense"]


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, quickstart, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tok = str(Path(quickstart["run_dir"]) / "tokenizer.json")
    _bad(hybridlm("tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.json")),
         "not a file, directory or glob")
    _bad(cli("tokenizer", "train", str(empty), "--out", str(tmp_path / "t.json")), "is empty")
    _bad(cli("tokenizer", "train", "stdlib-docs:qa", "--vocab-size", "100", "--out", str(tmp_path / "t.json")),
         "at least 264")
    _bad(cli("prepare", str(empty), "--tokenizer", tok, "--out", str(tmp_path / "d")), "is empty")
    _bad(cli("train", 'model.preset="tiny"', "model.windw=3"), "known keys:")
    _bad(cli("train", 'model.preset="tiny"', "model.n_layer=4", "model.n_dense_layers=6"),
         "n_dense_layers (6) is larger than model.n_layer (4)")
    _bad(cli("train", 'model.preset="tiny"', "model.window=0"), "model.window must be > 0")
    _bad(cli("train", "--resume", f"train.out={tmp_path / 'nothing'}"), "nothing to resume")
    _bad(cli("generate", "--model", quickstart["run_dir"], "--prompt", "word " * 400), "shorten the prompt")
    _bad(cli("generate", "--model", str(tmp_path), "--prompt", "x"), "not a hybridlm run directory")
    _bad(cli("model", "info", "--preset", "huge"), "known presets")
    _bad(cli("model", "info"), "Missing option '--preset'")


def test_bad_recipes_get_one_line_and_exit_2_before_training(tmp_path, quickstart, cli):
    data = str(Path(quickstart["run_dir"]).parents[1] / "data" / "docstrings")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    unshared = tmp_path / "unshared.jsonl"
    unshared.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"})
                        + "\n" + json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                             "rejected": "\n\nHuman: z\n\nAssistant: c"}) + "\n")
    out = tmp_path / "out"
    base = f'[model]\npreset = "tiny"\n[recipe]\nout = "{out}"\ntotal_tokens = 10000\n'
    cases = [
        (f'[[stage]]\nname = "a"\nfraction = 1.0\ndata.mixture = {{ "{data}" = 0 }}\n', "sum to a positive number"),
        ('[[stage]]\nname = "a"\nfraction = 1.0\ntrain.objective = "rlhf"\ntrain.train_data = 1\n', "unknown train key"),
        (f'[[stage]]\nname = "a"\nfraction = 1.0\ntrain.objective = "dpo"\ndata.mixture = {{ "{data}" = 1 }}\n',
         "preference data not found"),
        ('[[stage]]\nname = "a"\nfraction = 1.0\ntrain.objective = "ppo"\n', "train.objective must be one of clm"),
        (f'[[stage]]\nname = "a"\nfraction = 1.0\ntrain.objective = "rm"\ndata.tokenizer = "{data}/tokenizer.json"\n'
         f'data.mixture = {{ "{unshared}" = 1 }}\n', "do not share a prompt (line 2)"),
        ('[[stage]]\nname = "a"\nfraction = 1.0\ndata.mixture = { "no/such/dir" = 1 }\n', "no/such/dir"),
        (f'[[stage]]\nname = "a"\nfraction = 1.0\ntrain.objective = "sft"\ndata.tokenizer = "{data}/tokenizer.json"\n'
         f'data.mixture = {{ "{bad_line}" = 1 }}\n', "line 2 is not valid JSON"),
    ]
    for i, (stage, needle) in enumerate(cases):
        recipe = tmp_path / f"r{i}.toml"
        recipe.write_text(base + stage)
        _bad(cli("train", "--recipe", str(recipe)), needle)
        assert not (out / "1-a" / "config.json").exists()
    # A later stage's missing or malformed data stops the recipe before its first stage trains.
    first = f'[[stage]]\nname = "a"\ntokens = 100\ndata.mixture = {{ "{data}" = 1 }}\n'
    for i, (later, needle) in enumerate([
        ('[[stage]]\nname = "b"\ntokens = 100\ndata.mixture = { "no/such/dir" = 1 }\n', "no/such/dir"),
        (f'[[stage]]\nname = "b"\ntokens = 100\ntrain.objective = "sft"\ndata.mixture = {{ "{bad_line}" = 1 }}\n',
         "line 2 is not valid JSON"),
    ]):
        recipe = tmp_path / f"later{i}.toml"
        recipe.write_text(base + first + later)
        _bad(cli("train", "--recipe", str(recipe)), needle)
        assert not (out / "1-a" / "config.json").exists()
    recipe = tmp_path / "ok.toml"
    recipe.write_text(base + first)
    _bad(cli("train", "--recipe", str(recipe), "--stage", "b"), "no stage named 'b'")
    _bad(cli("train", "--recipe", "paper-4stage"), "give a TOML file or a built-in recipe (align, paper-3stage)")
    _bad(cli("train", "--recipe", str(recipe), "--nproc-per-node", "2", "data.batch_size=3"),
         "must be divisible by the world size (2)")


def test_tampered_model_is_refused_and_nothing_is_damaged(tmp_path, quickstart):
    run = tmp_path / "run"
    shutil.copytree(quickstart["run_dir"], run)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _bad(hybridlm("generate", "--model", str(run), "--prompt", "x"), "does not match its recorded sha256")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_bench_json_pairs_dense_and_sparse():
    result = hybridlm("bench", "attention", "--seq", "300", "--pass", "fwdbwd", "--dtype", "fp32", "--repeats", "1",
                      "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    assert (row["seq"], row["dtype"], row["pass"]) == (300, "fp32", "fwdbwd")
    assert row["dense_s"] > 0 and row["sparse_s"] > 0
    assert row["speedup"] == pytest.approx(row["dense_s"] / row["sparse_s"])
    assert row["dense_peak_mb"] >= 0 and row["sparse_peak_mb"] >= 0
    gen = hybridlm("bench", "generate", "--preset", "tiny", "--seq", "200", "--repeats", "1", "--json")
    assert gen.returncode == 0, gen.stderr
    report = json.loads(gen.stdout)
    assert report["machine"] == machine()  # the CPU and the kernel path the figures ran on
    (row,) = report["results"]
    assert row["pass"] == "decode" and row["sparse_kv_cache_mb"] < row["dense_kv_cache_mb"]
    assert row["dense_prefill_tokens_per_s"] > 0 and row["sparse_prefill_tokens_per_s"] > 0
    quantized = hybridlm("bench", "generate", "--preset", "tiny", "--seq", "200", "--repeats", "1", "--quantize",
                         "int8", "--json")
    assert quantized.returncode == 0, quantized.stderr
    (int8_row,) = json.loads(quantized.stdout)["results"]
    for kind in ("dense", "sparse"):  # the blocks' weights went from 2 bytes to 1 (plus scales)
        assert int8_row[f"{kind}_weights_mb"] < 0.75 * row[f"{kind}_weights_mb"]
        assert int8_row[f"{kind}_kv_cache_mb"] == row[f"{kind}_kv_cache_mb"]
    _bad(hybridlm("bench", "train", "--quantize", "int8"), "takes no --quantize")
    _bad(hybridlm("bench", "generate", "--quantize", "int4", "--dtype", "fp32"), "use --dtype bf16")
    _bad(hybridlm("bench", "train", "--pass", "decode"), "measures passes train")
    _bad(hybridlm("bench", "attention", "--preset", "small"), "takes no --preset")
