"""Run benchmark points in subprocesses and pair hybridlm's sparse and dense paths into ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product

from hybridlm.errors import UserError

PASSES = {"attention": ("fwd", "fwdbwd"), "train": ("train",), "generate": ("decode",)}
DEFAULTS = {
    "attention": {"batch": 1, "heads": 8, "head_dim": 64, "window": 128, "stride": 128, "n_global": 8},
    "train": {"preset": "small", "batch_tokens": 8192},
    "generate": {"preset": "small", "new_tokens": 32},
}


def run_point(spec: dict) -> dict:
    """Measure one point in a fresh Python process; its stdout is one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "hybridlm.bench.points", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark point {spec} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(bench: str, seqs: list[int], dtypes: list[str], passes: list[str], repeats: int,
            options: dict, progress=None) -> list[dict]:
    """For each (seq, dtype, pass): dense and sparse measured one after the other, and their ratio."""
    unknown = sorted(set(passes) - set(PASSES[bench]))
    if unknown:
        raise UserError(f"bench {bench} measures passes {', '.join(PASSES[bench])} (got {', '.join(unknown)})")
    results = []
    for seq, dtype, pass_ in product(seqs, dtypes, passes):
        base = {**DEFAULTS[bench], **options, "bench": bench, "seq": seq, "dtype": dtype, "pass": pass_,
                "repeats": repeats}
        dense, sparse = (run_point({**base, "kind": kind}) for kind in ("dense", "sparse"))
        row = {"seq": seq, "dtype": dtype, "pass": pass_, "dense_s": dense["seconds"], "sparse_s": sparse["seconds"],
               "speedup": dense["seconds"] / sparse["seconds"], "dense_peak_mb": dense["peak_mb"],
               "sparse_peak_mb": sparse["peak_mb"]}
        for key in ("tokens_per_s", "prefill_tokens_per_s", "kv_cache_mb", "weights_mb"):
            if key in dense:
                row[f"dense_{key}"], row[f"sparse_{key}"] = dense[key], sparse[key]
        results.append(row)
        if progress:
            progress(row)
    return results


def format_row(row: dict) -> str:
    extra = ""
    if "dense_tokens_per_s" in row:
        extra = f"  tok/s {row['dense_tokens_per_s']:,.0f} -> {row['sparse_tokens_per_s']:,.0f}"
    if "dense_prefill_tokens_per_s" in row:
        extra += f"  prefill tok/s {row['dense_prefill_tokens_per_s']:,.0f} -> {row['sparse_prefill_tokens_per_s']:,.0f}"
    if "dense_kv_cache_mb" in row:
        extra += f"  KV {row['dense_kv_cache_mb']:.1f} -> {row['sparse_kv_cache_mb']:.1f} MB"
    if "dense_weights_mb" in row:
        extra += f"  weights {row['dense_weights_mb']:.1f} -> {row['sparse_weights_mb']:.1f} MB"
    return (f"seq {row['seq']:>6}  {row['dtype']:<4} {row['pass']:<7} dense {row['dense_s']:.4f}s  "
            f"sparse {row['sparse_s']:.4f}s  speedup {row['speedup']:.2f}x  peak MB {row['dense_peak_mb']:.0f} -> "
            f"{row['sparse_peak_mb']:.0f}{extra}")
