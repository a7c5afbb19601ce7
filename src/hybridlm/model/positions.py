"""Positional encodings: rotary (applied to q/k) or absolute (added to the embeddings)."""

from __future__ import annotations

import math

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form), tables precomputed for the whole context."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos_TF", torch.empty(0), persistent=False)
        self.register_buffer("sin_TF", torch.empty(0), persistent=False)
        self.fill_tables()

    def fill_tables(self) -> None:
        """Compute the tables (again, after a model built on the meta device got real storage)."""
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        angles_TF = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), inv_freq)
        device = self.cos_TF.device
        self.cos_TF, self.sin_TF = angles_TF.cos().to(device), angles_TF.sin().to(device)

    def forward(self, x_BHTD: torch.Tensor, start: int) -> torch.Tensor:
        n = x_BHTD.shape[2]
        cos, sin = self.cos_TF[start : start + n], self.sin_TF[start : start + n]
        x1, x2 = x_BHTD.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return rotated.to(x_BHTD.dtype)


def sinusoidal_table(max_seq_len: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need", shape (max_seq_len, dim)."""
    pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table
