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



@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

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
    dist.all_reduce(t)
    return float(t)


def sum_tensor_across(values: torch.Tensor, world: World) -> torch.Tensor:
    """The elementwise sum of a small CPU tensor over ranks (an MoE layer's expert load)."""
    if world.size == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.to(values.dtype).cpu()


def mean_across(value: float, world: World) -> float:
    """The mean of a float over ranks."""
    return sum_across(value, world) / world.size


def wrap_model(model: torch.nn.Module, parallel: str, world: World) -> torch.nn.Module:
    """The module training steps call: the model itself, DDP around it, or the model sharded in
    place with FSDP2 (`fully_shard` per block, then the root, which holds the tied embedding)."""
    if world.size == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


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
