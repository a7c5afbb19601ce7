"""The quickstart: tokenizer -> prepare -> train -> evaluate -> generate on `stdlib-docs`.

Everything lands in one directory: tokenizer.json, data/ (shards) and run/ (a complete run
directory). The presets' settings are sized for a 2-core CPU: `tiny` in under a minute,
`small` in under ten.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hybridlm.data.prepare import prepare
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.errors import UserError
from hybridlm.eval.perplexity import evaluate_split
from hybridlm.eval.unigram import unigram_bpb
from hybridlm.inference.generate import generate_text
from hybridlm.inference.sampling import SamplingParams
from hybridlm.run import load_run
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.args import run_config_from_dict
from hybridlm.train.trainer import train

CORPUS = "stdlib-docs"
SAMPLE_PROMPT = "Return the"
SETTINGS: dict[str, dict] = {
    "tiny": {
        "vocab_size": 2048,
        "model": {"preset": "tiny"},
        "train": {"steps": 150, "batch_size": 16, "seq_len": 128, "lr": 2e-3, "warmup_steps": 15,
                  "eval_every": 75, "checkpoint_every": 75, "eval_tokens": 16384},
    },
    "small": {
        "vocab_size": 4096,
        "model": {"preset": "small"},
        "train": {"steps": 300, "batch_size": 16, "seq_len": 256, "lr": 1e-3, "warmup_steps": 30,
                  "eval_every": 100, "checkpoint_every": 100, "eval_tokens": 32768},
    },
}


def run_quickstart(preset_name: str, out: Path, *, progress: bool = True) -> dict:
    """Run every stage into `out` and return the summary."""
    if preset_name not in SETTINGS:
        raise UserError(f"quickstart presets are {', '.join(SETTINGS)} (got {preset_name!r})")
    settings = SETTINGS[preset_name]
    out = Path(out)
    if (out / "run" / "config.json").exists():
        raise UserError(f"{out} already holds a quickstart run; remove it or pass another --out")
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"[1/5] training a {settings['vocab_size']}-token BPE tokenizer on {CORPUS}")
    tokenizer = train_tokenizer(iter_documents(resolve_source(CORPUS)), vocab_size=settings["vocab_size"])
    tokenizer.save(out / "tokenizer.json")
    say("[2/5] encoding the corpus into token shards")
    prepare([CORPUS], out / "tokenizer.json", out / "data")
    config = run_config_from_dict({
        "model": settings["model"],
        "train": {**settings["train"], "data": str(out / "data"), "out": str(out / "run")},
    })
    say(f"[3/5] training the {preset_name} model ({config.model.layer_pattern})")
    trained = train(config, progress=progress)
    say("[4/5] evaluating on the whole validation split")
    run = load_run(out / "run")
    val = evaluate_split(run.model, out / "data", config.train.seq_len, 1 << 62, trained["dtype"])
    say("[5/5] sampling")
    sample = "".join(generate_text(run, SAMPLE_PROMPT, SamplingParams(max_new_tokens=40, temperature=0.7, seed=0)))
    return {
        "run_dir": str(out / "run"),
        "preset": preset_name,
        "params": sum(p.numel() for p in run.model.parameters()),
        "train_tokens": trained["train_tokens"],
        "val_tokens": val["tokens"],
        "seconds": time.perf_counter() - t0,
        "train_seconds": trained["seconds"],
        "val_loss": val["loss"],
        "val_bpb": val["bpb"],
        "unigram_bpb": unigram_bpb(out / "data"),
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
        ("validation bits/byte", f"{s['val_bpb']:.3f}  (unigram baseline {s['unigram_bpb']:.3f})"),
        ("sample", repr(s["prompt"] + s["sample"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
