"""LoRA adapters served on one shared base: a request for model NAME decodes with adapter NAME,
alone or in a batch that mixes adapters and the base, exactly as that LoRA run decodes offline;
an adapter trained on other base weights is refused before serving, an unknown model gets 404."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import TINY_MODEL
from httpserver import KEY, NO_LIMITS, serving_run

from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.generate import completion_prompt_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.run import load_run
from hybridlm.serve.service import Service
from hybridlm.train.config import load_run_config
from hybridlm.train.trainer import train

PROMPTS = ["Paragraph 3: the value", "Paragraph 41:", "Paragraph 7: the"]
TOKENS = 10


def _lora(base, shards, out, targets: str, steps: int = 15):
    train(load_run_config(None, TINY_MODEL + [
        f"data.path={shards}", f"train.out={out}", f"train.steps={steps}", f"train.init_from={base}",
        "data.batch_size=8", "data.seq_len=64", "eval.every=0", "eval.tokens=512", f"checkpoint.every={steps}",
        "train.dtype=fp32", "optim.lr=3e-2", "lora.r=4", f"lora.targets={targets}"]), progress=False)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_run, tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"attn": _lora(tiny_run, tiny_shards, root / "attn", '["attn.qkv", "attn.proj"]'),
            "ffn": _lora(tiny_run, tiny_shards, root / "ffn", '["ffn.up", "ffn.down"]')}


def _offline(run_dir, prompt: str) -> str:
    """Greedy tokens of the run decoded alone, as text (up to the first end-of-turn marker)."""
    run = load_run(run_dir)
    ids = list(generate_ids(run.model, completion_prompt_ids(run.tokenizer, prompt),
                            SamplingParams(max_new_tokens=TOKENS, temperature=0.0), eos_id=run.tokenizer.eos_id))
    stops = {run.tokenizer.eos_id, run.tokenizer.special_ids["end"]}
    kept = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    return run.tokenizer.decode(kept)


def test_each_model_name_decodes_with_its_adapter_alone_and_in_mixed_batches(tiny_run, adapters, tmp_path):
    table = "{" + ", ".join(f'{name} = "{path}"' for name, path in adapters.items()) + "}"
    with serving_run(tiny_run, tmp_path, f"server.adapters={table}", *NO_LIMITS) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list().data) == sorted([live.model, "attn", "ffn"])
        runs = {live.model: tiny_run, **adapters}
        expected = {(name, p): _offline(run_dir, p) for name, run_dir in runs.items() for p in PROMPTS}
        assert len({expected[(name, PROMPTS[0])] for name in runs}) == 3  # the adapters change the replies

        def ask(job):
            name, prompt = job
            done = client.completions.create(model=name, prompt=prompt, max_tokens=TOKENS, temperature=0)
            return done.choices[0].text

        assert {job: ask(job) for job in expected} == expected  # one at a time
        with ThreadPoolExecutor(len(expected)) as pool:  # all at once: batches mixing the three
            assert dict(zip(expected, pool.map(ask, list(expected)))) == expected
        with pytest.raises(openai.NotFoundError, match="'attn', 'ffn'"):
            client.completions.create(model="other", prompt="x", max_tokens=2)


def test_adapters_trained_on_other_weights_or_malformed_are_refused(tiny_run, adapters, tiny_shards, tmp_path):
    other_base = adapters["ffn"]
    with pytest.raises(UserError, match="is a LoRA run; serve a plain base"):
        Service(adapters["attn"], adapters={"x": str(other_base)})
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "hybridlm", "lora", "merge", str(adapters["attn"]), "--out", str(merged)],
                   check=True, capture_output=True)
    with pytest.raises(UserError, match=r"adapter x: .* was trained on other base weights"):
        Service(merged, adapters={"x": str(adapters["ffn"])})
    with pytest.raises(UserError, match="is not a LoRA run"):
        Service(tiny_run, adapters={"x": str(tiny_run)})
    bad = subprocess.run([sys.executable, "-m", "hybridlm", "serve", "--model", str(tiny_run), "--adapter", "noequals"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --adapter 'noequals' must be NAME=PATH (a model name and a LoRA run directory)"]
    bad = subprocess.run([sys.executable, "-m", "hybridlm", "serve", "--model", str(tiny_run),
                          "--adapter", f"x={merged}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a LoRA run" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert json.loads((adapters["attn"] / "adapter_config.json").read_text())["r"] == 4


def test_a_lora_run_served_as_itself_replies_with_its_adapters(adapters, tmp_path):
    with serving_run(adapters["ffn"], tmp_path, *NO_LIMITS) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        for prompt in PROMPTS:
            done = client.completions.create(model=live.model, prompt=prompt, max_tokens=TOKENS, temperature=0)
            assert done.choices[0].text == _offline(adapters["ffn"], prompt)
