"""Exports decode the same on the oldest transformers release hybridlm declares and on the one this
environment has (the newest when the lock was made, or today's with `scripts/test --latest`).

For every config family, transformers' cached greedy generate() must equal its uncached one and
hybridlm's own greedy decode token for token, on a left-padded batch, with the prompt fed once and
then one token per step (a cache that is silently dropped shows as different tokens). Each release
runs tests/interop/hf_probe.py in its own environment: the floor's is .venv-hf-floor, which
`scripts/setup dev` builds from requirements/hf-floor.lock and which has no hybridlm in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_families import REMOTE_CONFIGS, family_run
from safetensors.torch import save_file

from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.interop.hf_export import export_hf
from hybridlm.run import load_run

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("hf_probe.py")
FLOOR_VENV = ROOT / ".venv-hf-floor"
FLOOR_PYTHON = FLOOR_VENV / "bin" / "python"
NEW_TOKENS = 12
REMOTE_CONFIG = ROOT / "src" / "hybridlm" / "interop" / "hf_remote" / "configuration_hybridlm.py"
TRANSFORMERS_FLOOR = re.search(r'^TRANSFORMERS_FLOOR = "(.+)"$', REMOTE_CONFIG.read_text(), re.MULTILINE).group(1)


def _python(release: str) -> str:
    if release == "current":
        return sys.executable
    assert FLOOR_PYTHON.is_file(), f"{FLOOR_PYTHON} is missing: `scripts/setup dev` builds it"
    return str(FLOOR_PYTHON)


@torch.no_grad()
def _export_with_reference(name: str, run: Path, root: Path) -> dict:
    """Export `run`, and write the inputs and hybridlm's logits the probe compares against."""
    export_hf(run, root / "export", "remote")
    loaded = load_run(run)
    model, pad = loaded.model, loaded.tokenizer.special_ids["pad"]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(8, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (30, 21)]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits = torch.zeros(*ids.shape, model.cfg.vocab_size)
    for row, p in enumerate(prompts):
        logits[row, width - len(p):] = model(torch.tensor([p]))[0]
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits}, root / "reference.safetensors")
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    ours = [list(generate_ids(model, p, greedy, eos_id=None)) for p in prompts]
    text = "Paragraph 7: the value of x7 is 10. naïve 😀"
    return {"name": name, "dir": str(root / "export"), "logits": str(root / "reference.safetensors"),
            "new_tokens": NEW_TOKENS, "pad_id": pad, "prompt_len": width, "hybridlm": ours, "text": text,
            "text_ids": [loaded.tokenizer.eos_id, *loaded.tokenizer.encode(text)]}


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("hf_releases")
    made = [_export_with_reference("trained-tiny", tiny_run, root / "trained")]
    for name in REMOTE_CONFIGS:
        made.append(_export_with_reference(name, family_run(name, tiny_run, root / name), root / name))
    return made


@pytest.mark.parametrize("release", ["floor", "current"])
def test_cached_generate_equals_uncached_and_hybridlm_on_each_release(release, exports, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"exports": exports}))
    result = subprocess.run([_python(release), str(PROBE), str(request), str(tmp_path / "answer.json")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads((tmp_path / "answer.json").read_text())
    if release == "floor":
        assert answer["transformers"] == TRANSFORMERS_FLOOR
    for export in exports:
        got = answer["exports"][export["name"]]
        assert got["logit_error"] < 1e-4, (release, export["name"], got["logit_error"])
        assert got["fed"] == [export["prompt_len"]] + [1] * (NEW_TOKENS - 1), (release, export["name"])
        assert got["cached"] == got["uncached"] == export["hybridlm"], (release, export["name"])
        assert got["text_ids"] == export["text_ids"], (release, export["name"])  # <|eos|> first, as in training


LOAD = """
import sys, transformers
from transformers import AutoModelForCausalLM
print(transformers.__version__)
AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
"""


def test_a_release_below_the_floor_is_refused_in_one_line_naming_the_floor(exports, tmp_path):
    """The release before the floor (requirements/hf-below-floor.lock, laid over the floor's
    environment) stops at the export's own check, not somewhere inside transformers."""
    env = {**os.environ, "PYTHONPATH": str(FLOOR_VENV / "below-floor"), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([_python("floor"), "-c", LOAD, exports[0]["dir"]], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    version = result.stdout.strip()
    assert version and tuple(map(int, version.split(".")[:2])) < tuple(map(int, TRANSFORMERS_FLOOR.split(".")[:2]))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"ImportError: this hybridlm export needs transformers>={TRANSFORMERS_FLOOR} (found {version}); "
                    f"upgrade it: pip install 'transformers>={TRANSFORMERS_FLOOR}'"), result.stderr[-3000:]
