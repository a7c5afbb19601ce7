"""Pipeline parallelism (parallel.strategy = "pp") on torch.distributed.pipelining.

The processes form a (pp, dp) mesh of `parallel.pp_degree` stages (one per process by default).
A stage is a contiguous group of blocks (stage 0 also embeds the tokens, the last stage applies
the final norm and the head), and `parallel.pp_schedule` (gpipe or 1f1b) runs
`parallel.pp_microbatches` micro-batches of every batch through them. With several processes per
stage, those read different rows and FSDP2 shards the model across them (the stage module is the
FSDP root, so the pipeline schedule drives its gradient reduce-scatter).

Every process keeps the whole model's parameters (sharded across dp) but updates only its
stage's; the tied embedding, used by the first stage (input) and the last (output), has its two
gradients summed across them first, as Megatron does. Before a checkpoint or an evaluation each
stage broadcasts its parameters (and AdamW moments) along the pp dimension, so checkpoints keep
the single-process format and any layout resumes any other. Causal language modelling only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybridlm.device import autocast
from hybridlm.errors import UserError
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.tensors import local_tensor
from hybridlm.train.distributed import fully_shard_model, mean_across


def check_pipeline(cfg, stages: int, replicas: int) -> None:
    """Refuse, by name, a run that `stages` stages of `replicas` processes each cannot pipeline."""
    if stages > cfg.model.n_layer:
        raise UserError(f"parallel.strategy = \"pp\" puts one stage of blocks on each of {stages} processes, but "
                        f"the model has {cfg.model.n_layer} blocks (model.n_layer); use at most {cfg.model.n_layer}")
    if cfg.train.objective != "clm":
        raise UserError(f"pipeline parallelism trains train.objective = \"clm\" only (got {cfg.train.objective!r}); "
                        "use ddp or fsdp")
    if cfg.parallel.pp_microbatches < stages:
        raise UserError(f"parallel.pp_microbatches ({cfg.parallel.pp_microbatches}) must be at least the number of "
                        f"stages ({stages}), or the pipeline idles")
    if cfg.data.batch_size % (replicas * cfg.parallel.pp_microbatches):
        per_stage = f" times the {replicas} processes of a stage" if replicas > 1 else ""
        raise UserError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by parallel.pp_microbatches "
                        f"({cfg.parallel.pp_microbatches}){per_stage}")
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
    module: nn.Module
    """The stage module (the FSDP2 root when the stage's processes shard it)."""
    stage: int
    stages: int
    group: object
    """The process group of this rank's stages (one rank of each, the same rows)."""
    schedule: object
    owner: dict[str, int]
    """Parameter name -> the stage that updates it."""

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def build_pipeline(model: nn.Module, cfg, mesh, device: torch.device) -> Pipeline:
    """This rank's stage of the (pp, dp) `mesh`, sharded across dp when the stage has several ranks."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage, stages = mesh["pp"].get_local_rank(), mesh["pp"].size()
    owner = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            owner[name] = next(s for s in range(stages) if int(name.split(".")[1]) in stage_blocks(
                model.cfg.n_layer, stages, s))
        else:  # embeddings (stage 0; the tied head's gradient is summed into it), final norm and head (last)
            owner[name] = 0 if name.startswith(("tok_emb", "pos_emb")) else stages - 1
    module = Stage(model, stage_blocks(model.cfg.n_layer, stages, stage), stage == 0, stage == stages - 1)
    if mesh["dp"].size() > 1:
        fully_shard_model(model, mesh["dp"], root=module)
    group = mesh["pp"].get_group()
    runner = PipelineStage(module, stage, stages, device, group=group)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.parallel.pp_schedule]
    return Pipeline(model, module, stage, stages, group, kind(runner, cfg.parallel.pp_microbatches, loss_fn=_loss),
                    owner)


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
    dist.broadcast(loss, group=pipeline.group, group_src=pipeline.stages - 1)
    return float(loss)


def sum_tied_gradients(pipeline: Pipeline) -> None:
    """The tied embedding is the input table on stage 0 and the head on the last: sum both gradients."""
    model = pipeline.model
    if not model.cfg.tie_embeddings:
        return
    weight = model.tok_emb.weight
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    dist.all_reduce(local_tensor(grad), group=pipeline.group)  # the same shard of it on each stage
    weight.grad = grad


def owned_gradient_norm(pipeline: Pipeline, params: dict[str, torch.Tensor]) -> float:
    """The 2-norm of all stages' gradients (each parameter counted on its owner only; the sum over
    all ranks adds up the shards of a stage too)."""
    square = torch.zeros(1, dtype=torch.float64)
    for name, param in params.items():
        if pipeline.owner[name] == pipeline.stage and param.grad is not None:
            square += local_tensor(param.grad).double().pow(2).sum()
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
    """Broadcast every parameter (and its AdamW moments) from its owner stage, so each process holds
    the whole up-to-date model: before a checkpoint or an evaluation. Sharded parameters go shard by
    shard: the ranks of one pp group hold the same shard."""
    for name, param in pipeline.model.named_parameters():
        src = pipeline.owner[name]
        dist.broadcast(local_tensor(param.data), group=pipeline.group, group_src=src)
        state = optimizer.state.setdefault(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state or src != pipeline.stage:
                state[key] = state.get(key, torch.zeros_like(param))
                dist.broadcast(local_tensor(state[key]), group=pipeline.group, group_src=src)
        step = state.get("step", torch.zeros(()))
        dist.broadcast(step, group=pipeline.group, group_src=src)
        state["step"] = step


@contextlib.contextmanager
def whole_model(pipeline: Pipeline) -> Iterator[None]:
    """The model callable as a whole (an evaluation): the stage's FSDP2 root keeps the embeddings,
    final norm and head, which the model's own forward then needs unsharded; the blocks gather
    themselves."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(pipeline.module, FSDPModule):
        yield
        return
    pipeline.module.unshard()
    try:
        yield
    finally:
        pipeline.module.reshard()


def pipeline_train_step(pipeline: Pipeline, optimizer: torch.optim.Optimizer, rows: tuple, lr: float,
                        max_norm: float, dtype: str, replicas) -> float:
    """One optimizer step of a batch through the pipeline: the mean loss over the stage's
    `replicas` (the World of ranks that split the batch; nan when the update was skipped for a
    non-finite loss or gradient, on every rank alike)."""

    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(dtype, rows[0].device):
        loss = mean_across(pipeline_loss(pipeline, rows[0], rows[1]), replicas)
    sum_tied_gradients(pipeline)
    norm = clip_owned(pipeline, max_norm)
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss if math.isfinite(norm) else math.nan
