"""The quickstart: tokenizer -> prepare -> three-stage training -> evaluate -> generate on `stdlib-docs`.

Everything lands in one directory: tokenizer.json, data/docstrings and data/reference (shards) and
run/ (one run directory per stage: 1-broad, 2-focused, 3-instruct). The presets' settings are sized
for a 2-core CPU with bf16 matmul (AVX-512 BF16 or AMX): `tiny` in under a minute, `small` in under
ten. Elsewhere training runs in fp32, several times slower, and the quickstart says so first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hybridlm.data.prepare import prepare
from hybridlm.device import default_device, resolve_dtype
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.errors import UserError
from hybridlm.train.validation import evaluate_split
from hybridlm.eval.unigram import unigram_bpb
from hybridlm.inference.generate import generate_text
from hybridlm.inference.sampling import SamplingParams
from hybridlm.run import load_run
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.recipe import plan_stages, recipe_document, run_recipe

CORPUS = "stdlib-docs"
SAMPLE_PROMPT = "Return the"
SAMPLE_PARAMS = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3)
"""Greedy with a repetition penalty: a small model sampled at temperature 0.7 printed noise, and
plain greedy decoding falls into loops."""
RECIPE = "paper-3stage"
"""The method's three stages (80 / 15 / 5% of the tokens, learning rates 3e-4 : 1e-4 : 5e-5) on the
built-in corpus: docstrings, then the language reference, then question/answer pairs."""
SETTINGS: dict[str, dict] = {
    "tiny": {"vocab_size": 2048, "model": {"preset": "tiny"}, "steps": 150, "lr": 2e-3,
             "data": {"batch_size": 16, "seq_len": 128}, "eval": {"tokens": 16384}},
    "small": {"vocab_size": 4096, "model": {"preset": "small"}, "steps": 300, "lr": 1e-3,
              "data": {"batch_size": 16, "seq_len": 256}, "eval": {"tokens": 32768}},
}
"""How each quickstart size resizes the recipe: model, steps over all stages, the first stage's
peak learning rate, batch shape and validation tokens."""


def quickstart_recipe(preset_name: str, out: Path) -> dict:
    """The built-in three-stage recipe resized for a quickstart preset, its data under `out`."""
    s = SETTINGS[preset_name]
    doc = recipe_document(RECIPE)
    stages = doc["stage"]
    first_lr = stages[0]["optim"]["lr"]
    resized = []
    for stage in stages:
        steps = round(stage["fraction"] * s["steps"])
        # Rates relative to the first stage's: the recipe's 3e-4 / 1e-4 is 2.9999999999999996 in
        # floating point, so the ratio is rounded before dividing (lr / 3 exactly, not one ulp off).
        slower = round(first_lr / stage["optim"]["lr"], 9)
        mixture = {_under(out, spec): weight for spec, weight in stage["data"]["mixture"].items()}
        resized.append({**stage, "data": {**stage["data"], "mixture": mixture}, "optim": {"lr": s["lr"] / slower},
                        "schedule": {**stage["schedule"], "warmup_steps": max(1, steps // 10)},
                        "checkpoint": {"every": max(1, steps // 2)}})
    total = s["steps"] * s["data"]["batch_size"] * s["data"]["seq_len"]
    return {**doc, "model": s["model"], "recipe": {"out": str(out / "run"), "total_tokens": total},
            "data": {**doc["data"], **s["data"]}, "eval": {**doc["eval"], **s["eval"]}, "stage": resized}


def _under(out: Path, spec: str) -> str:
    """A recipe source under the quickstart's directory: runs/data/X -> OUT/data/X; built-ins kept."""
    return str(out / "data" / Path(spec).name) if spec.startswith("runs/data/") else spec


def speed_hint(preset_name: str) -> str | None:
    """What to expect where training cannot run in bf16 (a CPU without AVX-512 BF16 or AMX, e.g.
    AVX2 laptops): the presets are sized by tokens for a bf16 CPU, and fp32 steps take several
    times longer, so the user hears it before the wait rather than after."""
    if preset_name == "tiny" or resolve_dtype("auto", default_device()) == "bf16":
        return None
    return ("note: this machine has no bf16 matmul (AVX-512 BF16, AMX or a bf16 GPU), so training runs in fp32, "
            f"several times slower than the {preset_name} preset's size assumes; `--preset tiny` shows the whole "
            "pipeline in a few minutes")


def run_quickstart(preset_name: str, out: Path, *, progress: bool = True) -> dict:
    """Run every step into `out` and return the summary."""
    if preset_name not in SETTINGS:
        raise UserError(f"quickstart presets are {', '.join(SETTINGS)} (got {preset_name!r})")
    settings = SETTINGS[preset_name]
    out = Path(out)
    if (out / "run").exists():
        raise UserError(f"{out} already holds a quickstart run; remove it or pass another --out")
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if hint := speed_hint(preset_name):
        say(hint)
    say(f"[1/5] training a {settings['vocab_size']}-token BPE tokenizer on {CORPUS}")
    tokenizer = train_tokenizer(iter_documents(resolve_source(CORPUS)), vocab_size=settings["vocab_size"])
    tokenizer.save(out / "tokenizer.json")
    say("[2/5] encoding docstrings and the language reference into token shards")
    for part in ("docstrings", "reference"):
        prepare([f"{CORPUS}:{part}"], out / "tokenizer.json", out / "data" / part)
    stages = plan_stages(quickstart_recipe(preset_name, out))
    say(f"[3/5] training the {preset_name} model ({stages[0].run.model.layer_pattern}) in three stages: "
        + ", ".join(f"{s.name} {s.run.train.steps} steps" for s in stages))
    t_train = time.perf_counter()
    trained = run_recipe(stages, progress=progress)
    train_seconds = time.perf_counter() - t_train
    say("[4/5] evaluating on the whole validation splits")
    final = Path(trained[-1]["run_dir"])
    run = load_run(final)
    seq_len = settings["data"]["seq_len"]
    val = {part: evaluate_split(run.model, out / "data" / part, seq_len, 1 << 62, trained[0]["dtype"])
           for part in ("docstrings", "reference")}
    say("[5/5] sampling")
    sample = "".join(generate_text(run, SAMPLE_PROMPT, SAMPLE_PARAMS))
    return {
        "run_dir": str(final),
        "preset": preset_name,
        "params": sum(p.numel() for p in run.model.parameters()),
        "train_tokens": sum(t["train_tokens"] for t in trained),
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "stages": [{"stage": t["stage"], "objective": t["objective"], "steps": t["steps"],
                    "train_tokens": t["train_tokens"], "seconds": t["seconds"], "val_loss": t["val_loss"],
                    **({"val_bpb": t["val_bpb"]} if "val_bpb" in t else {})} for t in trained],
        "val_tokens": val["docstrings"]["tokens"],
        "val_loss": val["docstrings"]["loss"],
        "val_bpb": val["docstrings"]["bpb"],
        "reference_val_bpb": val["reference"]["bpb"],
        "unigram_bpb": unigram_bpb(out / "data" / "docstrings"),
        "prompt": SAMPLE_PROMPT,
        "sample": sample,
    }


def format_summary(s: dict) -> str:
    rows = [
        ("run directory", s["run_dir"]),
        ("preset", s["preset"]),
        ("parameters", f"{s['params']:,}"),
        ("training tokens", f"{s['train_tokens']:,}"),
        ("time", f"{s['seconds']:.1f} s (training {s['train_seconds']:.1f} s)"),
        *((f"stage {t['stage']} ({t['objective']})", _stage_line(t)) for t in s["stages"]),
        ("validation bits/byte", f"{s['val_bpb']:.3f} on docstrings (unigram baseline {s['unigram_bpb']:.3f}), "
                                 f"{s['reference_val_bpb']:.3f} on the language reference"),
        ("sample", repr(s["prompt"] + s["sample"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _stage_line(t: dict) -> str:
    figures = f"val bits/byte {t['val_bpb']:.3f}" if "val_bpb" in t else f"held-out reply loss {t['val_loss']:.3f}"
    return f"{t['steps']} steps, {t['train_tokens']:,} tokens, {t['seconds']:.1f} s, {figures}"
