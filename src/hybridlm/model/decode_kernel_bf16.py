"""The C++ decode-step kernels for CPUs with AVX-512 BF16 or AVX2 (csrc/decode_bf16.cpp).

A decode step is a few rows through every weight matrix and one query per head against the KV
cache. PyTorch's bf16 kernels are built for many rows: a one-row Linear reads its weights at
about a tenth of the bandwidth the CPU has, and SDPA leaves its threads idle for one query. These
kernels read each weight, key and value once (fp32 accumulation, one bf16 rounding). They serve
inference only (no autograd), on the avx512_bf16 and avx2 kernel paths (cpu_kernels.py).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from hybridlm.device import cpu_has_bf16
from hybridlm.model.cpu_kernels import cpu_extension

MAX_ROWS = 4
"""Rows up to which the Linear kernel beats oneDNN's bf16 GEMM (measured at 1, 4 and 8 rows on
384..8192-wide layers: 3-7x faster at one row, even at four, slower at eight)."""


def decode_extension():
    """The decode kernels' module for this process's kernel path, or None (the torch path, or no compiler)."""
    return cpu_extension("hybridlm_decode", "decode_bf16.cpp", "bf16 decode kernels", ("avx512_bf16", "avx2"))


def _inference_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype is torch.bfloat16 and b.dtype is torch.bfloat16 and not torch.is_grad_enabled()
            and a.device.type == "cpu" and b.device.type == "cpu" and not isinstance(b, DTensor)
            and not torch.compiler.is_compiling())


def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few bf16 rows through a plain bf16 CPU weight, without autograd, on the avx512_bf16 path."""
    return (x.numel() <= MAX_ROWS * weight.shape[1] and _inference_bf16(x, weight)
            and decode_extension() is not None)


def widens_bf16(*tensors: torch.Tensor) -> bool:
    """A bf16 CPU matmul of `tensors` on a CPU without native bf16 (no AVX-512 BF16 or AMX), where
    oneDNN's bf16 GEMM runs about 5x slower than fp32 (a 512-token prefill, measured on an AVX2 CPU):
    the caller widens to fp32, multiplies and rounds once, the numbers torch's bf16 matmul gives
    (fp32 accumulation)."""
    return (all(t.dtype is torch.bfloat16 and t.device.type == "cpu" and not isinstance(t, DTensor) for t in tensors)
            and not cpu_has_bf16())


ACTIVATION_CODES = {"none": 0, "gelu_tanh": 1, "swiglu": 2}


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str = "none") -> torch.Tensor:
    """x @ weight.T + bias for x (..., K) of at most MAX_ROWS rows, then `activation` in fp32:
    none, gelu_tanh, or swiglu (silu of the first half of the outputs times the second half)."""
    out = decode_extension().linear(x.reshape(-1, x.shape[-1]), weight, bias, ACTIVATION_CODES[activation])
    return out.view(*x.shape[:-1], out.shape[-1])


def attention_applies(q_BH1D: torch.Tensor, keys: list[torch.Tensor]) -> bool:
    """One bf16 query per head without autograd; key sets with unit stride along the head dim."""
    return (q_BH1D.shape[2] == 1 and all(k.stride(3) == 1 and _inference_bf16(q_BH1D, k) for k in keys)
            and decode_extension() is not None)


def decode_attention_bf16(q_BH1D: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V for one query per head over the key sets `keys` (each (B or 1,
    n_kv_head, S_i, D)) taken together, as if concatenated along S; grouped heads share a key-value
    head."""
    pairs = [(k, v) if k.stride() == v.stride() else (k.contiguous(), v.contiguous()) for k, v in zip(keys, values)]
    return decode_extension().decode_attention(q_BH1D, [k for k, _ in pairs], [v for _, v in pairs],
                                         1.0 / math.sqrt(q_BH1D.shape[-1]))
