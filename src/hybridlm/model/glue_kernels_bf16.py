"""The C++ glue kernels of a bf16 step for CPUs with AVX-512 BF16 (csrc/glue_bf16.cpp): RoPE,
SwiGLU, GELU (tanh form), RMSNorm/LayerNorm and the chunked cross-entropy's softmax in one pass
each, forward and backward.

PyTorch runs each as several elementwise kernels with promotions and temporaries between them:
RoPE alone took about 14 ms a call for one `small` layer's heads at 8 x 1024 tokens, 8% of a bf16
training step. Built on first use on the avx512_bf16 kernel path (cpu_kernels.py); elsewhere, and
under torch.compile (which fuses the plain ops itself), the callers' PyTorch ops run.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from hybridlm.model.cpu_kernels import cpu_extension


def _extension():
    return cpu_extension("hybridlm_glue", "glue_bf16.cpp", "bf16 glue kernels", ("avx512_bf16",))


def _on_path(*tensors: torch.Tensor) -> bool:
    """Plain CPU tensors (not a tensor-parallel DTensor), eager, on the avx512_bf16 path."""
    return (all(t.device.type == "cpu" and not isinstance(t, DTensor) for t in tensors)
            and not torch.compiler.is_compiling() and _extension() is not None)


def rope_kernel_applies(x_BTND: torch.Tensor) -> bool:
    """bf16 CPU heads (B, T, heads, D) with unit stride along D, on the avx512_bf16 path."""
    return x_BTND.dtype is torch.bfloat16 and x_BTND.dim() == 4 and x_BTND.stride(3) == 1 and _on_path(x_BTND)


def rotate_bf16(x_BTND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """(x1 cos - sign x2 sin, x2 cos + sign x1 sin) in fp32, rounded to bf16 once; cos and sin fp32,
    broadcastable to (B, T, 1, D/2). Returns a contiguous (B, T, heads, D) tensor."""
    return _extension().rotate(x_BTND, cos.float(), sin.float(), sign)


def activation_kernel_applies(x: torch.Tensor) -> bool:
    """A bf16 CPU tensor (SwiGLU: [gate | up] rows) on the avx512_bf16 path: SwiGLU's and GELU's kernels take it."""
    return x.dtype is torch.bfloat16 and _on_path(x)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of x = [gate | up] (..., 2F) -> (..., F), in fp32 and rounded once; the
    backward writes both halves' gradients in one pass (PyTorch: silu, mul, their backwards and a cat)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        return _extension().swiglu(flat).view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = _extension().swiglu_backward(grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad.view(x.shape)


class GELUTanh(torch.autograd.Function):
    """GELU in its tanh form (GPT-2's) of bf16 values, in fp32 and rounded once, forward and backward:
    PyTorch's bf16 gelu took 22 ms forward and 24 ms backward a GPT-2-shaped layer (8 x 1024 x 1536)
    on an AMX Xeon, 13% of the training step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _extension().gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _extension().gelu_tanh_backward(grad_y.to(x.dtype), x)


def norm_kernel_applies(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> bool:
    """fp32 rows, weight and bias under bf16 CPU autocast (a training step), on the avx512_bf16 path."""
    params = [weight] if bias is None else [weight, bias]
    return (x.dtype is torch.float32 and weight is not None and all(t.dtype is torch.float32 for t in params)
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
            and _on_path(x, *params))


class NormToBF16(torch.autograd.Function):
    """RMSNorm, or with center=True LayerNorm, of fp32 rows written in bf16, the dtype autocast's
    next matmul casts them to anyway: one pass forward (PyTorch: the norm's ops, then the cast) and
    one backward that reads the bf16 gradient as it comes (PyTorch casts it to fp32 first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                center: bool) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y, mean, rstd = _extension().norm(flat, weight, weight.new_empty(0) if bias is None else bias, eps, center)
        ctx.save_for_backward(flat, weight, mean, rstd)
        ctx.shape, ctx.center, ctx.has_bias = x.shape, center, bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        flat, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _extension().norm_backward(grad_y.reshape(flat.shape), flat, weight, mean, rstd,
                                                            ctx.center, ctx.has_bias)
        return grad_x.view(ctx.shape), grad_w, grad_b if ctx.has_bias else None, None, None


def cross_entropy_kernel_applies(logits_NV: torch.Tensor) -> bool:
    """A chunk of bf16 CPU logits on the avx512_bf16 path."""
    return logits_NV.dtype is torch.bfloat16 and logits_NV.dim() == 2 and _on_path(logits_NV)


def cross_entropy_rows(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, the target's logit) of each row, fp32, read straight from bf16 logits."""
    lse, picked = _extension().cross_entropy_rows(logits_NV, targets_N)
    return lse, picked


def cross_entropy_grad(logits_NV: torch.Tensor, targets_N: torch.Tensor, lse_N: torch.Tensor,
                       scale_N: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot(target)) * scale of each row, in fp32 and rounded to bf16 once."""
    return _extension().cross_entropy_grad(logits_NV, targets_N, lse_N, scale_N)
