"""Tensor helpers below every layer: saving a run (run.py) and training (train/) both gather
FSDP2-sharded parameters, so the helper lives here rather than in train/, which serving never loads."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or state; collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t
