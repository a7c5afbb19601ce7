"""Scale-out on PyTorch's own engine: process group from torchrun, DDP or FSDP2 wrapping.

`torchrun --nproc-per-node N -m hybridlm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything runs as one process and no group is created. Gloo on CPU, NCCL on CUDA.
Checkpoints are always gathered into the single-process format (full tensors, written by rank 0),
so a run saved by N ranks loads on any M: see checkpoint.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from hybridlm.errors import UserError
from hybridlm.tensors import full_tensor



@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: object = None
    """The process group of these ranks for reductions (None: the default group of all ranks)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun process group once (later calls reuse it); one process without torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_across(value: float, world: World) -> float:
    """The sum of a float over ranks, in float64 (exact for counts; a non-finite value anywhere makes
    the result non-finite)."""
    if world.size == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, group=world.group)
    return float(t)


def sum_tensor_across(values: torch.Tensor, world: World) -> torch.Tensor:
    """The elementwise sum of a small CPU tensor over ranks (an MoE layer's expert load)."""
    if world.size == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(t, group=world.group)
    return t.to(values.dtype).cpu()


def mean_across(value: float, world: World) -> float:
    """The mean of a float over ranks."""
    return sum_across(value, world) / world.size


def check_world(cfg, size: int) -> None:
    """Refuse a run config that `size` processes cannot train (the batch split, tensor parallel
    divisibility, the pipeline's stages), in one line, before any of them starts."""
    from hybridlm.train.schedule import batch_schedule
    from hybridlm.train.tensor_parallel import check_tensor_parallel

    degree = tensor_parallel_degree(cfg.parallel, size)
    if size % degree:
        raise UserError(f"parallel.tp_degree ({degree}) must divide the number of processes ({size})")
    stages = pipeline_degree(cfg.parallel, size)
    if size % stages:
        raise UserError(f"parallel.pp_degree ({stages}) must divide the number of processes ({size})")
    batch_schedule(cfg, size // degree // stages)  # the ranks that split a batch
    if degree > 1:
        check_tensor_parallel(cfg.model, cfg.lora.r, degree)
    if stages > 1:
        from hybridlm.train.pipeline_parallel import check_pipeline

        check_pipeline(cfg, stages, size // stages)


def tensor_parallel_degree(parallel, size: int) -> int:
    """How many processes split each block: parallel.tp_degree (0: all of them) under tp, else 1."""
    if parallel.strategy != "tp":
        return 1
    return parallel.tp_degree or size


def pipeline_degree(parallel, size: int) -> int:
    """How many pipeline stages: parallel.pp_degree (0: one per process) under pp, else 1."""
    if parallel.strategy != "pp":
        return 1
    return parallel.pp_degree or size


def device_mesh(parallel, world: World):
    """Under tensor parallelism, the (dp, tp) mesh of the processes: consecutive ranks split a block,
    and the dp groups (FSDP2 across them when there are several) read different rows. Under
    pipeline parallelism, the (pp, dp) mesh: consecutive ranks run one stage, sharded with FSDP2
    across them when there are several, and read different rows."""
    if parallel.strategy not in ("tp", "pp") or world.size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if parallel.strategy == "pp":
        stages = pipeline_degree(parallel, world.size)
        return init_device_mesh(device, (stages, world.size // stages), mesh_dim_names=("pp", "dp"))
    degree = tensor_parallel_degree(parallel, world.size)
    return init_device_mesh(device, (world.size // degree, degree), mesh_dim_names=("dp", "tp"))


def data_world(parallel, world: World, mesh=None) -> World:
    """The ranks that split each batch: all of them (ddp, fsdp); the dp groups of a (dp, tp) or
    (pp, dp) mesh, where the ranks of one group compute their parts of the same rows (tensor
    parallelism) or the stages of the same rows (pipeline parallelism); none without such groups."""
    if parallel.strategy not in ("tp", "pp"):
        return world
    if mesh is None or mesh["dp"].size() == 1:
        return World()
    return World(rank=mesh["dp"].get_local_rank(), size=mesh["dp"].size(), group=mesh["dp"].get_group())


def wrap_model(model: torch.nn.Module, parallel, world: World, mesh=None) -> torch.nn.Module:
    """The module training steps call: the model itself, DDP around it, the model sharded in place
    with FSDP2 (`fully_shard` per block, then the root, which holds the tied embedding), or its
    blocks split across the ranks (tensor parallelism, train/tensor_parallel.py; on a (dp, tp)
    mesh with FSDP2 across dp too)."""
    if world.size == 1:
        return model
    if parallel.strategy == "pp":
        return model  # the stages are built (and sharded across dp) by train/pipeline_parallel.py
    if parallel.strategy == "tp":
        from hybridlm.train.tensor_parallel import apply_tensor_parallel, mark_layouts

        layouts = apply_tensor_parallel(model, mesh["tp"])
        if mesh["dp"].size() > 1:
            fully_shard_model(model, mesh["dp"])
            mark_layouts(model, layouts)  # fully_shard made new Parameters
        return model
    if parallel.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return fully_shard_model(model, None)


def fully_shard_model(model: torch.nn.Module, mesh, root: torch.nn.Module | None = None) -> torch.nn.Module:
    """FSDP2 per block, then the root (the model, or a pipeline stage around it): the module whose
    forward gathers the embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model if root is None else root, mesh=mesh)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to a total 2-norm of `max_norm` and return the norm before clipping, as
    torch.nn.utils.clip_grad_norm_ does. Its fused path refuses a mix of DTensor and plain gradients
    (tensor parallelism shards the blocks, not the embeddings), so a mix takes each gradient's own
    norm (a DTensor's reduced over its shards) and scales with the same coefficient."""
    grads = [p.grad for p in params if p.grad is not None]
    meshes = {g.device_mesh for g in grads if isinstance(g, DTensor)}
    if len({isinstance(g, DTensor) for g in grads}) < 2 and len(meshes) < 2:
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    norms = torch.stack([full_tensor(torch.linalg.vector_norm(g, 2.0)) for g in grads])
    total = torch.linalg.vector_norm(norms, 2.0)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coefficient)
    return float(total)


def shard_like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `reference`: sharded the same way when it is a DTensor."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements)
    return full.to(reference.device, reference.dtype)


@contextlib.contextmanager
def gradient_sync(stepper: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of micro-batches before the last one of a step (DDP no_sync,
    FSDP2 requires_gradient_sync); gradients still sum locally, so the result is the same."""
    if sync or not hasattr(stepper, "no_sync") and not hasattr(stepper, "set_requires_gradient_sync"):
        yield
    elif hasattr(stepper, "no_sync"):
        with stepper.no_sync():
            yield
    else:
        stepper.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            stepper.set_requires_gradient_sync(True)
