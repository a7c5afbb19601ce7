"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridlm.train.config import RunConfig


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """Decay matrices and embeddings; leave norms, biases and other vectors undecayed."""
    optim = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=1e-8)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr over schedule.warmup_steps, then schedule.decay: cosine or linear
    decay to lr * min_lr_ratio, or constant."""
    lr, schedule = cfg.optim.lr, cfg.schedule
    if step < schedule.warmup_steps:
        return lr * (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return lr
    span = max(1, cfg.train.steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    floor = lr * schedule.min_lr_ratio
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
    return floor + (lr - floor) * decay
