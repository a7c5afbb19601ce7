"""Pipeline parallelism (parallel.strategy = "pp") on torch.distributed.pipelining.

Each of the N torchrun processes is one stage: a contiguous group of blocks (stage 0 also embeds
the tokens, the last stage applies the final norm and the head), and `parallel.pp_schedule`
(gpipe or 1f1b) runs `parallel.pp_microbatches` micro-batches of every batch through them. Every
process keeps the whole model's parameters but updates only its stage's; the tied embedding, used
by the first stage (input) and the last (output), has its two gradients summed across them first,
as Megatron does. Before a checkpoint or an evaluation each stage broadcasts its parameters (and
AdamW moments), so checkpoints keep the single-process format and any layout resumes any other.
Causal language modelling only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybridlm.errors import UserError
from hybridlm.model.loss import IGNORE_INDEX


def check_pipeline(cfg, stages: int) -> None:
    """Refuse, by name, a run `stages` processes cannot pipeline."""
    if stages > cfg.model.n_layer:
        raise UserError(f"parallel.strategy = \"pp\" puts one stage of blocks on each of {stages} processes, but "
                        f"the model has {cfg.model.n_layer} blocks (model.n_layer); use at most {cfg.model.n_layer}")
    if cfg.train.objective != "clm":
        raise UserError(f"pipeline parallelism trains train.objective = \"clm\" only (got {cfg.train.objective!r}); "
                        "use ddp or fsdp")
    if cfg.parallel.pp_microbatches < stages:
        raise UserError(f"parallel.pp_microbatches ({cfg.parallel.pp_microbatches}) must be at least the number of "
                        f"stages ({stages}), or the pipeline idles")
    if cfg.data.batch_size % cfg.parallel.pp_microbatches:
        raise UserError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by parallel.pp_microbatches "
                        f"({cfg.parallel.pp_microbatches})")
    if cfg.model.ffn == "moe" or cfg.lora.r:
        raise UserError("pipeline parallelism of MoE or LoRA runs is not implemented; use ddp or fsdp")


def stage_blocks(n_layer: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: contiguous, earlier stages taking the remainder."""
    size, extra = divmod(n_layer, stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


class Stage(nn.Module):
    """One stage's share of the model's forward pass."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.model, self.blocks, self.first, self.last = model, blocks, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.first:
            x = model.embed(x, torch.arange(x.shape[1], device=x.device))
        for index in self.blocks:
            x = model.blocks[index](x, 0, None, True)
        return model.lm_head(model.norm_f(x)) if self.last else x


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class Pipeline:
    """This process's stage, its schedule and which parameters it owns."""

    model: nn.Module
    stage: int
    stages: int
    schedule: object
    owner: dict[str, int]
    """Parameter name -> the stage that updates it."""

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def build_pipeline(model: nn.Module, cfg, rank: int, stages: int, device: torch.device) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    blocks = stage_blocks(model.cfg.n_layer, stages, rank)
    owner = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            owner[name] = next(s for s in range(stages) if int(name.split(".")[1]) in stage_blocks(
                model.cfg.n_layer, stages, s))
        else:  # embeddings (stage 0; the tied head's gradient is summed into it), final norm and head (last)
            owner[name] = 0 if name.startswith(("tok_emb", "pos_emb")) else stages - 1
    module = Stage(model, blocks, rank == 0, rank == stages - 1)
    stage = PipelineStage(module, rank, stages, device)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.parallel.pp_schedule]
    return Pipeline(model, rank, stages, kind(stage, cfg.parallel.pp_microbatches, loss_fn=_loss), owner)


def pipeline_loss(pipeline: Pipeline, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Forward and backward of one batch through the pipeline; the mean loss, known to every stage."""
    losses: list[torch.Tensor] = []
    if pipeline.stage == 0:
        pipeline.schedule.step(ids, return_outputs=False)
    elif pipeline.last:
        pipeline.schedule.step(target=targets, losses=losses, return_outputs=False)
    else:
        pipeline.schedule.step(return_outputs=False)
    loss = torch.tensor([float(torch.stack(losses).mean()) if losses else 0.0], dtype=torch.float64)
    dist.broadcast(loss, src=pipeline.stages - 1)
    return float(loss)


def sum_tied_gradients(pipeline: Pipeline) -> None:
    """The tied embedding is the input table on stage 0 and the head on the last: sum both gradients."""
    model = pipeline.model
    if not model.cfg.tie_embeddings:
        return
    weight = model.tok_emb.weight
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    dist.all_reduce(grad)
    weight.grad = grad


def owned_gradient_norm(pipeline: Pipeline, params: dict[str, torch.Tensor]) -> float:
    """The 2-norm of all stages' gradients (each parameter counted on its owner only)."""
    square = torch.zeros(1, dtype=torch.float64)
    for name, param in params.items():
        if pipeline.owner[name] == pipeline.stage and param.grad is not None:
            square += param.grad.double().pow(2).sum()
    dist.all_reduce(square)
    return float(square.sqrt())


def clip_owned(pipeline: Pipeline, max_norm: float) -> float:
    """Clip like torch.nn.utils.clip_grad_norm_ over the whole model; gradients of parameters this
    stage does not own are dropped, so the optimizer leaves them alone."""
    params = dict(pipeline.model.named_parameters())
    for name, param in params.items():
        if pipeline.owner[name] != pipeline.stage and not (name == "tok_emb.weight" and pipeline.last):
            param.grad = None
    norm = owned_gradient_norm(pipeline, params)
    coefficient = min(max_norm / (norm + 1e-6), 1.0)
    for param in params.values():
        if param.grad is not None:
            param.grad.mul_(coefficient)
    return norm


def share_parameters(pipeline: Pipeline, optimizer: torch.optim.Optimizer) -> None:
    """Broadcast every parameter (and its AdamW moments) from its owner, so each process holds the
    whole up-to-date model: before a checkpoint or an evaluation."""
    for name, param in pipeline.model.named_parameters():
        src = pipeline.owner[name]
        dist.broadcast(param.data, src=src)
        state = optimizer.state.setdefault(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state or src != pipeline.stage:
                state[key] = state.get(key, torch.zeros_like(param))
                dist.broadcast(state[key], src=src)
        step = state.get("step", torch.zeros(()))
        dist.broadcast(step, src=src)
        state["step"] = step


def pipeline_train_step(pipeline: Pipeline, optimizer: torch.optim.Optimizer, rows: tuple, lr: float,
                        max_norm: float, dtype: str) -> float:
    """One optimizer step of a batch through the pipeline: the mean loss (nan when the update was
    skipped for a non-finite loss or gradient, on every stage alike)."""
    import math

    from hybridlm.device import autocast

    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(dtype, rows[0].device):
        loss = pipeline_loss(pipeline, rows[0], rows[1])
    sum_tied_gradients(pipeline)
    norm = clip_owned(pipeline, max_norm)
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss if math.isfinite(norm) else math.nan
