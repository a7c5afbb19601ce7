"""Tensor helpers below every layer: saving a run (run.py) and training (train/) both gather
FSDP2- and tensor-parallel-sharded parameters (and put tensor parallelism's row order back, see
train/tensor_parallel.py), so the helpers live here rather than in train/, which serving never loads."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or state; collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (differentiable), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def rank_major(full: torch.Tensor, segments: list[int], degree: int) -> torch.Tensor:
    """Rows [s_0 | s_1 | ...] -> [s_0 chunk 0 | s_1 chunk 0 | ... | s_0 chunk 1 | ...]."""
    chunks = [segment.chunk(degree) for segment in full.split(segments)]
    return torch.cat([chunk for rank in range(degree) for chunk in (c[rank] for c in chunks)])


def canonical(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The single-process layout of `full` (a gathered parameter, or a moment of it)."""
    layout = getattr(param, "tp_segments", None)
    if layout is None or full.dim() == 0:  # AdamW's step count is a scalar
        return full
    segments, degree = layout
    pieces = full.split([s // degree for _ in range(degree) for s in segments])
    return torch.cat([pieces[rank * len(segments) + i] for i in range(len(segments)) for rank in range(degree)])


def tensor_parallel_layout(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` in the single-process layout -> the layout `param` is sharded in."""
    layout = getattr(param, "tp_segments", None)
    return full if layout is None else rank_major(full, *layout)
