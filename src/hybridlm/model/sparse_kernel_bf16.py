"""The C++ sparse attention kernel for CPUs with AVX-512 BF16 (csrc/sparse_attention_bf16.cpp).

It is compiled on first use with torch's extension builder (about 30 s, cached under
~/.cache/torch_extensions) and used for bf16 whole-sequence attention on the avx512_bf16 kernel
path (cpu_kernels.py; HYBRIDLM_KERNEL=torch stays on PyTorch's kernels); a failed build falls back
to them with one warning.
"""

from __future__ import annotations

import torch

from hybridlm.model.cpu_kernels import cpu_extension

_HEAD_DIMS = (32, 64, 128)


def _extension():
    """The compiled module, or None when it cannot be had here."""
    return cpu_extension("hybridlm_sparse", "sparse_attention_bf16.cpp", "bf16 attention kernel", ("avx512_bf16",))


def kernel_applies(q: torch.Tensor) -> bool:
    """bf16 CPU tensors with a supported head dim, on the avx512_bf16 kernel path."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-1] in _HEAD_DIMS
            and _extension() is not None)


class SparseAttentionBF16(torch.autograd.Function):
    """Exact sparse causal attention in one fused C++ kernel (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, window: int, stride: int, block: int):
        B, H, n, D = q.shape
        flat = [t.reshape(B * H, -1, D).contiguous() for t in (q, k, v)]
        if k_global is None:
            k_global = v_global = q.new_zeros(B, H, 0, D)
        glob = [t.reshape(B * H, -1, D).contiguous() for t in (k_global, v_global)]
        out, lse = _extension().forward(*flat, *glob, window, stride, block)
        ctx.save_for_backward(*flat, *glob, out, lse)
        ctx.geometry = (B, H, window, stride, block)
        return out.view(B, H, n, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kg, vg, out, lse = ctx.saved_tensors
        B, H, window, stride, block = ctx.geometry
        g = grad_out.reshape(B * H, -1, q.shape[-1]).contiguous().to(q.dtype)
        dq, dk, dv, dkg, dvg = _extension().backward(g, q, k, v, kg, vg, out, lse, window, stride, block)
        shape = (B, H, -1, q.shape[-1])
        glob = (dkg.view(shape).to(q.dtype), dvg.view(shape).to(q.dtype)) if kg.shape[1] else (None, None)
        return dq.view(shape), dk.view(shape), dv.view(shape), *glob, None, None, None


@torch.compiler.disable
def sparse_attention_bf16(q, k, v, k_global, v_global, window: int, stride: int, block: int) -> torch.Tensor:
    """Call the kernel; torch.compile leaves this call out of its graphs (it cannot trace C++)."""
    return SparseAttentionBF16.apply(q, k, v, k_global, v_global, window, stride, block)
