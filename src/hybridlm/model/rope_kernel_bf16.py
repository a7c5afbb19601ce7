"""The C++ RoPE kernel for CPUs with AVX-512 BF16 (csrc/rope_bf16.cpp): bf16 q and k heads rotated in
one pass, forward and backward.

PyTorch's elementwise ops promote each bf16 half against the fp32 tables and cast back: about 14 ms
a call for one `small` layer's heads at 8 x 1024 tokens, 8% of a bf16 training step. Built on first
use on the avx512_bf16 kernel path (cpu_kernels.py); elsewhere the caller's PyTorch ops run.
"""

from __future__ import annotations

import torch

from hybridlm.model.cpu_kernels import cpu_extension


def _extension():
    return cpu_extension("hybridlm_rope", "rope_bf16.cpp", "bf16 RoPE kernel", ("avx512_bf16",))


def rope_kernel_applies(x_BTND: torch.Tensor) -> bool:
    """bf16 CPU heads (B, T, heads, D) with unit stride along D, on the avx512_bf16 path."""
    return (x_BTND.dtype is torch.bfloat16 and x_BTND.device.type == "cpu" and x_BTND.dim() == 4
            and x_BTND.stride(3) == 1 and _extension() is not None)


def rotate_bf16(x_BTND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """(x1 cos - sign x2 sin, x2 cos + sign x1 sin) in fp32, rounded to bf16 once; cos and sin fp32,
    broadcastable to (B, T, 1, D/2). Returns a contiguous (B, T, heads, D) tensor."""
    return _extension().rotate(x_BTND, cos.float(), sin.float(), sign)
