"""lm-evaluation-harness's own `local-completions` model against a live `hybridlm serve` on
127.0.0.1: it scores multiple-choice items through echo + logprobs, and must get the log-
likelihoods and accuracies `hybridlm eval run` gets on the same items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MC_TASK_YAML
from httpserver import KEY, NO_LIMITS, serving_run

pytest.importorskip("lm_eval")

from hybridlm.eval.scoring import Scorer
from hybridlm.interop.hf_export import export_hf

ITEMS = [  # made-up items in the tiny corpus's style: with and without context
    {"context": f"Paragraph {i}: the value of x{i} is", "choices": [f" {i * 7 % 13}.", f" {(i * 7 + 3) % 13}."],
     "label": 0} for i in range(6)
] + [{"context": "", "choices": [f"Paragraph {i}:", f"Value {i} of"], "label": 0} for i in range(3)]


def test_lm_eval_local_completions_scores_like_eval_run(tiny_run, tmp_path):
    data, tasks = tmp_path / "items.jsonl", tmp_path / "tasks"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks.mkdir()
    (tasks / "items.yaml").write_text(MC_TASK_YAML.format(name="items", data=data, shots=0))
    export_hf(tiny_run, tmp_path / "tokenizer", "remote")  # lm-eval tokenizes with the exported tokenizer
    script = Path(sys.executable).parent / "lm_eval"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OPENAI_API_KEY": KEY}
    with serving_run(tiny_run, tmp_path, *NO_LIMITS) as live:
        # lm-eval's API models put no BOS before a context unless asked: add_bos_token puts the
        # export's BOS, <|eos|>, the document boundary hybridlm trains and scores with.
        args = (f"base_url={live.url}/v1/completions,model={live.model},tokenizer={tmp_path / 'tokenizer'},"
                "tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1")
        result = subprocess.run([*command, "--model", "local-completions", "--model_args", args, "--tasks", "items",
                                 "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
                                 "--log_samples"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [samples_file] = (tmp_path / "out").rglob("samples_items_*.jsonl")
    samples = sorted(map(json.loads, samples_file.open()), key=lambda s: s["doc_id"])
    pairs = [(s["arguments"][f"gen_args_{i}"]["arg_0"], s["arguments"][f"gen_args_{i}"]["arg_1"])
             for s in samples for i in range(len(s["resps"]))]
    theirs = [float(r[0][0]) for s in samples for r in s["resps"]]
    ours = [ll for ll, _ in Scorer.from_path(tiny_run, dtype="fp32").loglikelihood(pairs)]
    assert any(c == "" for c, _ in pairs) and theirs == pytest.approx(ours, abs=1e-4)
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["items"]["acc,none"]
    scored = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--tasks",
                             f"mc:{data}", "--dtype", "fp32", "--json"], capture_output=True, text=True, timeout=600,
                            check=False)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["tasks"][f"mc:{data}"]["metrics"]["acc"] == pytest.approx(accuracy, abs=1e-12)
