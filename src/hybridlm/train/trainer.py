"""The training loop: causal-LM steps, evaluation, metrics, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hybridlm.device import autocast, default_device, resolve_dtype
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, atomic_write_text, read_json
from hybridlm.lineage import lineage_record
from hybridlm.model import HybridLM
from hybridlm.run import load_run, save_final
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.args import RunConfig, TrainConfig, run_config_from_dict
from hybridlm.train.checkpoint import checkpoint_dirs, latest_valid_checkpoint, load_checkpoint, save_checkpoint
from hybridlm.train.optim import build_optimizer, lr_at
from hybridlm.train.stage_data import StageData, build_stage_data, stage_tokenizer


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the checkpoint are dropped first."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            atomic_write_text(path, "")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def prepare_run_dir(cfg: RunConfig, resume: bool) -> tuple[RunConfig, Path | None, StageData]:
    """Create or reopen the run directory; return the config to use, the checkpoint to load and the
    run's data (built before anything is written, so bad sources fail first)."""
    run_dir = Path(cfg.train.out)
    if resume:
        if not (run_dir / "config.json").is_file():
            raise UserError(f"nothing to resume in {run_dir}: no config.json; start without --resume")
        saved = run_config_from_dict(read_json(run_dir / "config.json", "run config"))
        checkpoint = latest_valid_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"no valid checkpoint in {run_dir}/checkpoints; start the run again without --resume")
        saved = dataclasses.replace(saved, train=dataclasses.replace(saved.train, steps=cfg.train.steps))
        return saved, checkpoint, build_stage_data(saved.train, TextTokenizer.load(run_dir / "tokenizer.json"))
    if checkpoint_dirs(run_dir) or (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or set another train.out")
    tokenizer = stage_tokenizer(cfg.train)
    data = build_stage_data(cfg.train, tokenizer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    tokenizer.save(run_dir / "tokenizer.json")
    return cfg, None, data


def _initial_state(model: HybridLM, optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> None:
    """Start from train.init_from's final weights (the previous stage of a recipe), and with
    train.init_optimizer from its last checkpoint's AdamW moments too (this run's settings kept)."""
    if not tcfg.init_from:
        return
    parent = load_run(Path(tcfg.init_from))
    if parent.model.cfg != model.cfg:
        raise UserError(f"train.init_from {tcfg.init_from} has another model config than this run; "
                        "use the same [model] settings")
    model.load_state_dict(parent.model.state_dict())
    if tcfg.init_optimizer:
        checkpoint = latest_valid_checkpoint(Path(tcfg.init_from))
        if checkpoint is None:
            raise UserError(f"train.init_optimizer: {tcfg.init_from} has no valid checkpoint to take moments from")
        settings = [{k: g[k] for k in ("betas", "eps", "weight_decay")} for g in optimizer.param_groups]
        load_checkpoint(checkpoint, model, optimizer)
        for group, kept in zip(optimizer.param_groups, settings):
            group.update(kept)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train to cfg.train.steps; return the final summary (also the last metrics record)."""
    cfg, checkpoint, data = prepare_run_dir(cfg, resume)
    tcfg, run_dir = cfg.train, Path(cfg.train.out)
    device = default_device()
    dtype = resolve_dtype(tcfg.dtype, device)
    torch.manual_seed(tcfg.seed)
    model = HybridLM(cfg.model).to(device)
    optimizer = build_optimizer(model, tcfg)
    if checkpoint is None:
        _initial_state(model, optimizer, tcfg)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer)["step"]
    metrics = MetricsLog(run_dir / "metrics.jsonl", start_step if checkpoint else None)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
    bar = tqdm(total=tcfg.steps, initial=start_step, file=sys.stderr, disable=not progress, unit="step",
               desc=f"train {run_dir.name}", dynamic_ncols=True, mininterval=1.0)
    forward = torch.compile(model) if tcfg.compile else model  # same parameters; eval and saving use model
    t0, last_eval = time.perf_counter(), {}
    for step in range(start_step, tcfg.steps):
        loss = train_step(forward, optimizer, data.mixture, step, tcfg, dtype, device)
        done = step + 1
        elapsed = time.perf_counter() - t0
        tok_s = tokens_per_step * (done - start_step) / elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            metrics.write({"step": done, "loss": loss, "lr": lr_at(step, tcfg), "tokens": done * tokens_per_step,
                           "tok_s": tok_s, "elapsed_s": elapsed, "tokens_by_source": _tokens_by_source(data, done, tcfg)})
        if (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps:
            last_eval = data.evaluate(model, dtype)
            metrics.write({"step": done, **{f"val_{k}": v for k, v in last_eval.items()}})
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
            save_checkpoint(run_dir, done, model, optimizer, {"data_position": done}, tcfg.keep_checkpoints)
    bar.close()
    tokens_by_source = _tokens_by_source(data, tcfg.steps, tcfg)
    atomic_write_json(run_dir / "lineage.json", lineage_record(
        [{**src, "tokens_drawn": tokens_by_source[src["spec"]]} for src in data.lineage],
        data.tokenizer.sha256(), parent_run=tcfg.init_from or None))
    save_final(run_dir, model)
    return {"run_dir": str(run_dir), "steps": tcfg.steps, "dtype": dtype,
            "train_tokens": tcfg.steps * tokens_per_step, "seconds": time.perf_counter() - t0,
            "tokens_by_source": tokens_by_source, **{f"val_{k}": v for k, v in last_eval.items()}}


def _tokens_by_source(data: StageData, steps: int, tcfg: TrainConfig) -> dict[str, int]:
    return {name: rows * tcfg.seq_len for name, rows in data.mixture.rows_drawn(steps).items()}


def train_step(model, optimizer, sampler, step: int, tcfg, dtype: str, device: torch.device) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, tcfg)
    total = 0.0
    for micro in range(tcfg.grad_accum):
        x, y = (t.to(device) for t in sampler.batch(step, micro))
        with autocast(dtype, device):
            loss = model(x, targets_BT=y) / tcfg.grad_accum
        loss.backward()
        total += loss.item()
    if tcfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
