"""`hybridlm eval efficiency`: the method's efficiency table for one run, every figure with its unit.

Size and cost figures come from what already exists (model/info.py for parameters and FLOPs,
metrics.jsonl for training time and tokens, the weights file for the size on disk); speed,
memory and energy are measured here by driving the inference engine exactly as `generate` does.
Every field is {"value", "unit", "method"} so a reader never has to guess what a number means or
how it was obtained, and estimates say they are estimates.
"""

from __future__ import annotations

import collections
import re
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridlm.errors import UserError
from hybridlm.eval.units import FIELDS, field, format_value
from hybridlm.fileio import read_json
from hybridlm.inference.decode import generate_ids, prefill
from hybridlm.inference.sampling import SamplingParams
from hybridlm.model import HybridLM
from hybridlm.model.cpu_kernels import machine
from hybridlm.model.info import model_info
from hybridlm.run import load_run_on_device
from hybridlm.timing import median_seconds, seconds
from hybridlm.train.metrics import load_stage, stage_seconds

WATTS_PER_CORE = 3.75
"""Estimated power of one busy core: AMD EPYC 9654 (Genoa, 96 cores, 360 W default TDP) gives
360 / 96 = 3.75 W. TDP is sustained package power at full load, so CPU-seconds x this figure is a
rough full-load estimate for a server core (DRAM and idle power not counted; laptop cores differ)."""
WATTS_SOURCE = "AMD EPYC 9654: 360 W TDP / 96 cores"
RAPL_ROOT = Path("/sys/class/powercap")
PACKAGE_DOMAIN = re.compile(r"^intel-rapl:\d+$")  # packages only: sub-domains (core, dram) are inside them
# --- energy -------------------------------------------------------------------------------------


def rapl_counters(root: Path = RAPL_ROOT) -> list[tuple[int, int]] | str:
    """(energy_uj, max_energy_range_uj) per RAPL package domain, or why they cannot be read
    (absent, or root-only since the PLATYPUS fix)."""
    domains = sorted(p for p in root.glob("intel-rapl:*") if PACKAGE_DOMAIN.match(p.name)) if root.is_dir() else []
    if not domains:
        return f"no RAPL package domains under {root}"
    try:
        return [(int((d / "energy_uj").read_text()), int((d / "max_energy_range_uj").read_text())) for d in domains]
    except (OSError, ValueError) as exc:
        return f"RAPL not readable ({type(exc).__name__}: {exc})"


def rapl_joules(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float:
    """Joules between two readings; a counter that passed its range wrapped around once."""
    total_uj = 0
    for (start, _), (end, span) in zip(before, after):
        total_uj += end - start if end >= start else end + span - start
    return total_uj / 1e6


@dataclass
class EnergyMeter:
    """Reads RAPL when it can, and always the process's CPU time (user + sys, all threads)."""

    rapl_root: Path = RAPL_ROOT

    def start(self) -> None:
        self._rapl, self._cpu = rapl_counters(self.rapl_root), time.process_time()

    def per_token(self, tokens: int) -> dict:
        cpu_s = time.process_time() - self._cpu
        after = rapl_counters(self.rapl_root)
        if isinstance(self._rapl, list) and isinstance(after, list):
            return field(rapl_joules(self._rapl, after) / tokens, "J/token",
                         "measured (RAPL): CPU package energy over the timed generations (other processes "
                         "included) / tokens generated")
        reason = self._rapl if isinstance(self._rapl, str) else after
        return field(cpu_s * WATTS_PER_CORE / tokens, "J/token",
                     f"estimate: {cpu_s:.3g} CPU-s (user+sys) x {WATTS_PER_CORE} W per core ({WATTS_SOURCE}) / "
                     f"tokens generated; {reason}")


# --- memory -------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator statistics, or the kernel's VmHWM (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, was_reset: bool) -> dict:
    if device.type == "cuda":
        return field(torch.cuda.max_memory_allocated(device), "B",
                     "torch.cuda.max_memory_allocated during the measurement (tensors: weights, cache, activations)")
    status = Path("/proc/self/status")
    match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE) if status.is_file() else None
    if match and was_reset:
        return field(int(match.group(1)) * 1024, "B", "peak RSS of the process during the measurement "
                     "(VmHWM reset first; weights, cache, activations, interpreter and libraries)")
    return field(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "B",
                 "peak RSS of the process since it started (ru_maxrss; the peak could not be reset)")


# --- speed --------------------------------------------------------------------------------------


def token_counts(context: int, prompt_tokens: int | None, new_tokens: int | None) -> tuple[int, int]:
    """Prompt and generated lengths; by default 512 + 128 tokens, shrunk to fit small contexts."""
    prompt = prompt_tokens if prompt_tokens is not None else min(512, context // 2)
    new = new_tokens if new_tokens is not None else min(128, context - prompt)
    if prompt < 1 or new < 2:
        raise UserError(f"need --prompt-tokens >= 1 and --new-tokens >= 2 (got {prompt} and {new})")
    if prompt + new > context:
        raise UserError(f"--prompt-tokens + --new-tokens ({prompt} + {new}) exceed the model's context ({context}); "
                        "lower them")
    return prompt, new


@torch.inference_mode()
def measure_speed(model: HybridLM, prompt_ids: list[int], new_tokens: int, repeats: int, meter: EnergyMeter) -> dict:
    """Prefill alone (median of `repeats`), then `repeats` greedy generations through the engine:
    time to the first token, and the cached decode steps after it. One warm-up run of each."""
    device = next(model.parameters()).device
    ids_1T = torch.tensor(prompt_ids, device=device)[None]
    prefill_s = median_seconds(lambda: prefill(model, ids_1T, model.new_cache())[0, 0].item(), repeats)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    generation(model, prompt_ids, params)  # warm-up
    meter.start()  # energy counts the timed generations only
    ttft, decode = zip(*(generation(model, prompt_ids, params) for _ in range(repeats)))
    return {"prefill_s": prefill_s, "ttft_s": statistics.median(ttft), "decode_s": statistics.median(decode),
            "energy": meter.per_token(repeats * new_tokens)}


def generation(model: HybridLM, prompt_ids: list[int], params: SamplingParams) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest) of one generation through the engine,
    eos ignored so that every run produces params.max_new_tokens tokens."""
    stream = generate_ids(model, prompt_ids, params, eos_id=None)
    return seconds(lambda: next(stream)), seconds(lambda: collections.deque(stream, maxlen=0))


# --- training cost ------------------------------------------------------------------------------


def lineage_runs(run_dir: Path) -> list[Path]:
    """The run and the runs it started from (lineage.json parent_run: a recipe's earlier stages,
    an init_from), oldest first. A parent no longer on disk ends the chain."""
    runs: list[Path] = []
    current: Path | None = run_dir
    while current is not None and current.is_dir() and current.resolve() not in runs:
        runs.append(current.resolve())
        lineage = current / "lineage.json"
        parent = read_json(lineage, "lineage").get("parent_run") if lineage.is_file() else None
        # recorded as given at training time: relative paths may be relative to another directory,
        # so a recipe's sibling stage directory is the fallback
        current = None if not parent else Path(parent) if Path(parent).is_dir() else current.parent / Path(parent).name
    return runs[::-1]


def training_cost(run_dir: Path) -> tuple[dict, dict]:
    """Training seconds and tokens of the model: its run plus the runs it was trained on from."""
    runs = [r for r in lineage_runs(run_dir) if (r / "metrics.jsonl").is_file()]
    stages = [load_stage(r.name, r) for r in runs]
    if not any(s.train for s in stages):
        missing = f"no training records in {run_dir}/metrics.jsonl"
        return field(None, "s", missing), field(None, "tokens", missing)
    where = f"summed over {len(stages)} runs ({', '.join(s.name for s in stages)})" if len(stages) > 1 else "this run"
    train_s = sum(stage_seconds(s) for s in stages)
    tokens = sum(s.train[-1].get("tokens", 0) for s in stages if s.train)
    return (field(train_s, "s", f"metrics.jsonl: training seconds (no evaluations) over resumed segments, {where}"),
            field(tokens, "tokens", f"metrics.jsonl: tokens of the last training record, {where}"))


# --- the report ---------------------------------------------------------------------------------


def efficiency_report(model_dir: Path, *, prompt_tokens: int | None = None, new_tokens: int | None = None,
                      dtype: str = "auto", repeats: int = 3, meter: EnergyMeter | None = None) -> dict:
    """Every field of the efficiency table for the run at `model_dir` (or a checkpoint in it)."""
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1 (got {repeats})")
    run, dtype = load_run_on_device(model_dir, dtype)
    model = run.model
    device = next(model.parameters()).device
    cfg = model.cfg
    prompt, new = token_counts(cfg.max_seq_len, prompt_tokens, new_tokens)
    ids = torch.randint(0, cfg.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    info = model_info(cfg)
    train_time, tokens_seen = training_cost(run.path)  # a damaged metrics.jsonl fails before the timing
    was_reset = reset_peak_memory(device)
    speed = measure_speed(model, ids, new, repeats, meter or EnergyMeter())
    memory = peak_memory(device, was_reset)
    setting = f"{dtype} on {device.type}, {torch.get_num_threads()} threads, batch 1"
    fields = {
        "params": field(info["params"], "params", "model_info: all parameters, tied weights counted once"),
        "flops_per_token": field(info["flops_per_token"], "FLOP/token",
                                 f"model_info: forward, mean over a {info['context']}-token context"),
        "training_time": train_time,
        "tokens_seen": tokens_seen,
        "prefill_tokens_per_s": field(prompt / speed["prefill_s"], "tokens/s",
                                      f"{prompt}-token prompt, median of {repeats}, {setting}"),
        "decode_tokens_per_s": field((new - 1) / speed["decode_s"], "tokens/s",
                                     f"{new - 1} cached greedy steps after the first token, median of {repeats}"),
        "time_to_first_token": field(speed["ttft_s"], "s", f"prefill of {prompt} tokens + the first greedy token"),
        "peak_memory": memory,
        "size_on_disk": field((Path(model_dir) / "model.safetensors").stat().st_size, "B", "model.safetensors"),
        "energy_per_token": speed["energy"],
    }
    return {"model": str(model_dir), "device": device.type, "dtype": dtype, "threads": torch.get_num_threads(),
            "machine": machine() if device.type == "cpu" else {"gpu": torch.cuda.get_device_name(device)},
            "prompt_tokens": prompt, "new_tokens": new, "repeats": repeats, "efficiency": fields}


def format_table(result: dict) -> str:
    """One aligned table: field, value with unit, and how it was obtained."""
    rows = [(FIELDS.get(key, key), format_value(f["value"], f["unit"]), f["method"])
            for key, f in result["efficiency"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    ran_on = result["machine"]
    where = (f"{ran_on['cpu']}, kernel path {ran_on['kernel_path']}" if "cpu" in ran_on else ran_on["gpu"])
    head = (f"{result['model']}: {result['dtype']} on {result['device']} ({where}), "
            f"{result['prompt_tokens']}-token prompt + {result['new_tokens']} new tokens")
    return "\n".join([head, *(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows)])
