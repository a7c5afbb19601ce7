"""The training loop: causal-LM steps, evaluation, metrics, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hybridlm.data.mixture import Mixture
from hybridlm.device import autocast, default_device, resolve_dtype
from hybridlm.errors import TrainingStopped, UserError
from hybridlm.fileio import atomic_write_json, read_json
from hybridlm.lineage import lineage_record
from hybridlm.model import HybridLM
from hybridlm.model.converters.lora import attach_lora
from hybridlm.model.moe import moe_layers, pop_moe_stats, pop_router_loss
from hybridlm.run import final_weights, load_run, lora_settings, save_final
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.config import RunConfig, saved_run_config
from hybridlm.train.checkpoint import (
    checkpoint_dirs,
    latest_valid_checkpoint,
    load_checkpoint_weights,
    load_optimizer_state,
    save_checkpoint,
)
from hybridlm.train.distributed import (
    World,
    barrier,
    check_world,
    clip_gradients,
    gradient_sync,
    data_world,
    device_mesh,
    init_world,
    mean_across,
    sum_across,
    sum_tensor_across,
    wrap_model,
)
from hybridlm.train.metrics import MetricsLog
from hybridlm.train.pipeline_parallel import (
    Pipeline,
    build_pipeline,
    pipeline_train_step,
    share_parameters,
    whole_model,
)
from hybridlm.train.tracking import MlflowRun, flatten
from hybridlm.train.optim import build_optimizer, lr_at
from hybridlm.train.schedule import BatchSchedule, batch_schedule
from hybridlm.train.objectives import OBJECTIVES, Rows, StepContext, step_figures
from hybridlm.train.stage_data import StageData, build_stage_data, stage_tokenizer


def prepare_run_dir(cfg: RunConfig, resume: bool, world: World) -> tuple[RunConfig, Path | None, StageData]:
    """Create or reopen the run directory; return the config to use, the checkpoint to load and the
    run's data (built before anything is written, so bad sources fail first). Every rank checks;
    only the main rank writes."""
    run_dir = Path(cfg.train.out)
    check_world(cfg, world.size)  # a world that does not divide the batch (or the heads, under tp) fails here
    if resume:
        if not (run_dir / "config.json").is_file():
            raise UserError(f"nothing to resume in {run_dir}: no config.json; start without --resume")
        saved = saved_run_config(read_json(run_dir / "config.json", "run config"))
        checkpoint = latest_valid_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"no valid checkpoint in {run_dir}/checkpoints; start the run again without --resume")
        # the layout is this launch's (any layout resumes any other): the whole [parallel] section
        saved = saved.replace(train={"steps": cfg.train.steps}, parallel=dataclasses.asdict(cfg.parallel))
        check_world(saved, world.size)
        return saved, checkpoint, build_stage_data(saved, TextTokenizer.load(run_dir / "tokenizer.json"))
    if checkpoint_dirs(run_dir) or final_weights(run_dir):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or set another train.out")
    head = data_head(cfg)
    tokenizer = stage_tokenizer(cfg)
    data = build_stage_data(cfg, tokenizer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, head=head))
    barrier(world)  # every rank has checked before the main rank writes
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
        tokenizer.save(run_dir / "tokenizer.json")
    return cfg, None, data


def data_head(cfg: RunConfig) -> str:
    """The model.head the objective trains; a config that asks for another one is refused."""
    head = OBJECTIVES[cfg.train.objective].head
    if cfg.model.head not in ("lm", head):
        raise UserError(f"model.head = {cfg.model.head!r} does not fit train.objective = {cfg.train.objective!r}, "
                        f"which trains a {head!r} head; leave model.head unset")
    return head


def _build(cfg: RunConfig, checkpoint: Path | None, world: World, device: torch.device, mesh):
    """The model (initial weights, adapters, checkpoint weights), the module steps call (wrapped or
    sharded), this process's pipeline stage (pp only), the optimizer (with restored moments) and
    the step to start from."""
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    model = HybridLM(cfg.model).to(device)
    if tcfg.init_from and (checkpoint is None or cfg.lora.r):  # a LoRA checkpoint holds only the adapters
        _load_initial_weights(model, tcfg.init_from)
    if cfg.lora.r:
        attach_lora(model, lora_settings(cfg.to_dict()))
    start_step = load_checkpoint_weights(checkpoint, model)["step"] if checkpoint else 0
    stepper = wrap_model(model, cfg.parallel, world, mesh)
    pipeline = _pipeline(model, cfg, world, device, mesh)
    optimizer = build_optimizer(model, cfg)
    if checkpoint is not None:
        load_optimizer_state(checkpoint, model, optimizer)
    elif tcfg.init_from and tcfg.init_optimizer:
        _load_initial_moments(model, optimizer, tcfg.init_from)
    return model, stepper, pipeline, optimizer, start_step


def _pipeline(model: HybridLM, cfg: RunConfig, world: World, device: torch.device, mesh) -> Pipeline | None:
    """This process's pipeline stage under parallel.strategy = "pp" with several processes (sharded
    across the stage's processes when it has several)."""
    if cfg.parallel.strategy != "pp" or world.size == 1:
        return None
    if cfg.data.grad_accum != 1:
        raise UserError("pipeline parallelism cuts each batch into parallel.pp_microbatches itself; "
                        "leave data.grad_accum at 1")
    return build_pipeline(model, cfg, mesh, device)


def _load_initial_weights(model: HybridLM, init_from: str) -> None:
    """Start from train.init_from's final weights (the previous stage of a recipe). A reward model
    starts from a language model (its reward head fresh); a policy never from a reward model."""
    parent = load_run(Path(init_from))
    if quantized := parent.config.get("quantization"):
        raise UserError(f"train.init_from {init_from} is a {quantized['to']} quantized run, made for inference; "
                        f"start from the run it was quantized from, {quantized['source']}")
    if dataclasses.replace(parent.model.cfg, head=model.cfg.head) != model.cfg:
        raise UserError(f"train.init_from {init_from} has another model config than this run; "
                        "use the same [model] settings")
    if parent.model.cfg.head == "reward" and model.cfg.head != "reward":
        raise UserError(f"train.init_from {init_from} is a reward model; a {model.cfg.head} run starts from a "
                        "language model (the SFT stage)")
    missing, _ = model.load_state_dict(parent.model.state_dict(), strict=False)
    if any(not name.startswith("reward_head.") for name in missing):
        raise UserError(f"train.init_from {init_from} lacks weights this model needs: {missing[:3]}")


def _load_initial_moments(model: HybridLM, optimizer: torch.optim.Optimizer, init_from: str) -> None:
    """With train.init_optimizer, take AdamW moments from init_from's last checkpoint (this run's
    hyper-parameters kept)."""
    checkpoint = latest_valid_checkpoint(Path(init_from))
    if checkpoint is None:
        raise UserError(f"train.init_optimizer: {init_from} has no valid checkpoint to take moments from")
    settings = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} for g in optimizer.param_groups]
    load_optimizer_state(checkpoint, model, optimizer)
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True, tracking_parent: str | None = None) -> dict:
    """Train to cfg.train.steps; return the final summary (also the last metrics record). Under
    torchrun every rank calls this; each draws its own slice of every batch. With train.tracking,
    the main rank logs to MLflow (a child of `tracking_parent`, a recipe's run, when given)."""
    world = init_world()
    cfg, checkpoint, data = prepare_run_dir(cfg, resume, world)
    tracker = None
    if cfg.train.tracking and world.is_main:
        tracker = MlflowRun.open(Path(cfg.train.out), cfg.train.tracking_uri, cfg.train.experiment,
                                 parent=tracking_parent)
        tracker.log_params(flatten(cfg.to_dict()))
    try:
        summary = _train(cfg, checkpoint, data, world, progress, tracker)
    except BaseException as exc:
        if tracker is not None:
            with contextlib.suppress(Exception):  # the training error is the one to report
                tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in summary.items() if k.startswith("val_") or k in ("seconds", "train_tokens")},
                            step=summary["steps"])
        tracker.log_file(Path(summary["run_dir"]) / "lineage.json")
        tracker.log_report(Path(summary["run_dir"]))
        tracker.finish()
    return summary


def _train(cfg: RunConfig, checkpoint, data, world, progress: bool, tracker: MlflowRun | None) -> dict:
    """The loop itself, from the prepared run directory (train() wraps it with tracking)."""
    tcfg, run_dir = cfg.train, Path(cfg.train.out)
    device = default_device()
    dtype = resolve_dtype(tcfg.dtype, device)
    mesh = device_mesh(cfg.parallel, world)
    batch_world = data_world(cfg.parallel, world, mesh)  # the ranks that split each batch
    schedule = batch_schedule(cfg, batch_world.size)
    model, stepper, pipeline, optimizer, start_step = _build(cfg, checkpoint, world, device, mesh)
    metrics = MetricsLog(run_dir / "metrics.jsonl", start_step if checkpoint else None, world.is_main, tracker)
    bar = tqdm(total=tcfg.steps, initial=start_step, file=sys.stderr, disable=not (progress and world.is_main),
               unit="step", desc=f"train {run_dir.name}", dynamic_ncols=True, mininterval=1.0)
    stepper = torch.compile(stepper) if tcfg.compile else stepper  # same parameters; eval and saving use model
    batches = RankBatches(data, schedule, batch_world, StepContext(cfg, data.tokenizer, model, data.state), device)
    drawn = SourceTokens(data.mixture, schedule)
    t0, eval_s, last_eval, bad_in_row = time.perf_counter(), 0.0, {}, 0
    for step in range(start_step, tcfg.steps):
        step_start = time.perf_counter()
        if pipeline is None:
            loss = train_step(stepper, optimizer, batches, step, cfg, dtype, batch_world)
        else:
            loss = pipeline_train_step(pipeline, optimizer, batches.get(step, 0), lr_at(step, cfg),
                                       cfg.optim.grad_clip or math.inf, dtype, batch_world)
        step_s = time.perf_counter() - step_start
        done = step + 1
        elapsed = time.perf_counter() - t0
        tok_s = (schedule.tokens_before(done) - schedule.tokens_before(start_step)) / (elapsed - eval_s)
        bar.update(1)
        bad_in_row = 0 if math.isfinite(loss) else bad_in_row + 1
        if bad_in_row:
            _skip_warning(run_dir, done, loss, bad_in_row, tcfg.max_bad_steps, metrics)
        else:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        objective_figures = step_figures(data.state)
        moe_figures = pop_moe_stats(model) if done % tcfg.log_every == 0 or done == tcfg.steps else {}
        if not bad_in_row and (done % tcfg.log_every == 0 or done == tcfg.steps):
            metrics.write({"step": done, "loss": loss, "lr": lr_at(step, cfg), "tokens": schedule.tokens_before(done),
                           "seq_len": schedule.seq_len_at(step), "batch_size": schedule.batch_at(step),
                           "tok_s": tok_s, "elapsed_s": elapsed, "train_s": elapsed - eval_s,
                           "tokens_by_source": drawn.at(done), "step_s": step_s, **objective_figures, **moe_figures})
        evaluating = (cfg.eval.every and done % cfg.eval.every == 0) or done == tcfg.steps
        if pipeline is not None and (evaluating or done % cfg.checkpoint.every == 0):
            share_parameters(pipeline, optimizer)  # every process holds the whole model before using it
        if evaluating:
            eval_start = time.perf_counter()
            with contextlib.nullcontext() if pipeline is None else whole_model(pipeline):
                last_eval = data.evaluate(model, dtype)
            eval_s += time.perf_counter() - eval_start
            metrics.write({"step": done, **{f"val_{k}": v for k, v in last_eval.items()}})
        if done % cfg.checkpoint.every == 0 or done == tcfg.steps:
            save_checkpoint(run_dir, done, model, optimizer, {"data_position": done}, cfg.checkpoint.keep,
                            write=world.is_main)
            barrier(world)
    bar.close()
    totals = drawn.at(tcfg.steps)
    if world.is_main:
        atomic_write_json(run_dir / "lineage.json", lineage_record(
            [{**src, "tokens_drawn": totals[src["spec"]]} for src in data.lineage],
            data.tokenizer.sha256(), parent_run=tcfg.init_from or None))
    lora = lora_settings(cfg.to_dict()) if cfg.lora.r else None
    save_final(run_dir, model, write=world.is_main, lora=lora, base=Path(tcfg.init_from) if lora else None)
    barrier(world)
    return {"run_dir": str(run_dir), "steps": tcfg.steps, "dtype": dtype, "world_size": world.size,
            "train_tokens": schedule.tokens_before(tcfg.steps), "seconds": time.perf_counter() - t0,
            "tokens_by_source": totals, **{f"val_{k}": v for k, v in last_eval.items()}}


def _skip_warning(run_dir: Path, step: int, loss: float, in_row: int, limit: int, metrics: MetricsLog) -> None:
    """Warn about a skipped step; stop the run when `limit` came in a row (checkpoints untouched)."""
    metrics.write({"step": step, "skipped": f"non-finite loss or gradient ({loss})"})
    warnings.warn(f"step {step}: non-finite loss or gradient ({loss}); step skipped ({in_row} in a row)",
                  stacklevel=2)
    if in_row >= limit:
        raise TrainingStopped(
            f"{in_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps = {limit}); stopped at "
            f"step {step}. The last good checkpoint in {run_dir}/checkpoints is intact: lower optim.lr or check the "
            "data, then rerun with --resume")


class SourceTokens:
    """Input tokens drawn per source by all ranks, tallied forward as training advances: each step's
    rows are counted once (the mixture's counting walk never restarts), so logging stays O(rows per
    step) however long the run is."""

    def __init__(self, mixture: Mixture, schedule: BatchSchedule) -> None:
        self.mixture, self.schedule = mixture, schedule
        self.steps, self.rows = 0, mixture.rows_drawn(0)
        self.tokens = dict.fromkeys(mixture.names, 0)

    def at(self, steps: int) -> dict[str, int]:
        """Tokens per source over the first `steps` steps (steps only grow between calls)."""
        while self.steps < steps:
            # One step at a time while shapes grow, then the steady rest in one jump.
            end = self.steps + 1 if self.steps < self.schedule.ramp_steps else steps
            after = self.mixture.rows_drawn(self.schedule.rows_before(end))
            for name in self.tokens:
                self.tokens[name] += (after[name] - self.rows[name]) * self.schedule.seq_len_at(self.steps)
            self.steps, self.rows = end, after
        return dict(self.tokens)


@dataclass
class RankBatches:
    """This rank's rows of each micro-batch, as the objective feeds them to the model."""

    data: StageData
    schedule: BatchSchedule
    world: World
    ctx: StepContext
    device: torch.device

    def get(self, step: int, micro: int) -> Rows:
        rows = self.schedule.batch_at(step)
        per_rank = rows // self.world.size
        first = self.schedule.rows_before(step) + micro * rows + self.world.rank * per_rank
        drawn = self.data.mixture.rows(first, per_rank, self.schedule.seq_len_at(step))
        self.ctx.step = step
        drawn = self.data.objective.batch(drawn, first, self.ctx)
        return tuple(part.to(self.device) for part in drawn)


def train_step(stepper, optimizer, batches: RankBatches, step: int, cfg: RunConfig, dtype: str,
               world: World) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss per scored token of
    the whole step, over every rank. A non-finite loss or gradient norm skips the update (every rank
    sees the same reduced values).

    Each micro-batch's mean loss is weighted by its share of the step's scored units (tokens, or
    pairs: the objective's `units`; times the world size, which DDP and FSDP divide gradients by),
    so the gradient is the mean over all scored units however they fall into micro-batches and
    ranks. Averaging the micro-batch means instead would over-weight the tokens of short replies
    (sft) and of sparsely masked rows (mlm).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    grad_accum = cfg.data.grad_accum
    objective = batches.data.objective
    micro_batches = [batches.get(step, micro) for micro in range(grad_accum)]
    scored = [objective.units(rows) for rows in micro_batches]
    step_scored = max(sum_across(sum(scored), world), 1.0)
    total = 0.0
    for micro, rows in enumerate(micro_batches):
        with gradient_sync(stepper, micro == grad_accum - 1):
            share = world.size * scored[micro] / step_scored
            with autocast(dtype, rows[0].device):
                loss = objective.loss(stepper, rows, batches.ctx) * share
            router = pop_router_loss(batches.ctx.model)  # MoE balancing and z-losses: trained, not logged as loss
            (loss if router is None else loss + router * share).backward()
        total += loss.item()
    total = mean_across(total, world)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = clip_gradients(params, cfg.optim.grad_clip or math.inf)
    if math.isfinite(total) and math.isfinite(norm):
        optimizer.step()
        for layer in moe_layers(batches.ctx.model).values():
            layer.update_balance_bias(lambda load: sum_tensor_across(load, world))
    optimizer.zero_grad(set_to_none=True)
    return total if math.isfinite(norm) else math.nan
