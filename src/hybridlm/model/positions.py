"""Positional encodings: rotary (applied to q/k) or absolute (added to the embeddings)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridlm.model.glue_kernels_bf16 import rope_kernel_applies, rotate_bf16


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

    def _apply(self, fn, recurse: bool = True):
        """Keep the tables in fp32 through `model.to(torch.bfloat16)`: bf16 angles would be off by
        up to 2^-9 relative, and a bf16 table makes x1 * cos a bf16 product (one more rounding)."""
        super()._apply(fn, recurse)
        if self.cos_TF.dtype != torch.float32 and self.cos_TF.device.type != "meta":
            self.fill_tables()
        return self

    def forward(self, x_BHTD: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, H, T, D) rotated for positions start..start+T-1."""
        return self.rotate_heads(x_BHTD.transpose(1, 2), start).transpose(1, 2)

    def rotate_heads(self, x_BTND: torch.Tensor, positions: int | list[int]) -> torch.Tensor:
        """x (B, T, heads, D), heads-inner as a projection writes them (q and k of every head in
        one call), rotated for positions start..start+T-1 (`positions` an int) or, with one
        position per row, for a decode step of rows at different positions (T = 1)."""
        if isinstance(positions, int):
            n = x_BTND.shape[1]
            cos, sin = self.cos_TF[positions : positions + n, None], self.sin_TF[positions : positions + n, None]
        else:
            cos, sin = self.cos_TF[positions][:, None, None], self.sin_TF[positions][:, None, None]
        return _rotate(x_BTND, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The fused rotation in eager mode; under torch.compile the plain formula, which Inductor fuses
    itself (AOT autograd mis-replays the fused one's writes into views of one buffer: a compiled
    training step failed with a garbage view shape)."""
    if torch.compiler.is_compiling():
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return _RotateHalf.apply(x, cos, sin)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """(x1 cos - sign x2 sin, x2 cos + sign x1 sin) of x (B, T, heads, D) written into the halves
    of one new tensor: no concatenation or temporaries; bf16/fp16 inputs are rotated in fp32 and
    rounded once (bf16 on the avx512_bf16 path in one C++ pass, glue_kernels_bf16.py)."""
    if rope_kernel_applies(x):
        return rotate_bf16(x, cos, sin, sign)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out.to(x.dtype)


class _RotateHalf(torch.autograd.Function):
    """Rotate-half RoPE with its own backward: the gradient is the rotation by the opposite angle,
    so nothing but the (shared) tables is saved. Four elementwise kernels each way, where autograd
    through the plain formula ran nine and kept their inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate_half(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_half(grad_out, cos, sin, -1.0), None, None


def sinusoidal_table(max_seq_len: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need", shape (max_seq_len, dim)."""
    pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table
