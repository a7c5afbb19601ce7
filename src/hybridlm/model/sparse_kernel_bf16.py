"""The C++ sparse attention kernels for bf16 whole-sequence attention on CPUs with AVX-512 BF16.

Two kernels, one algorithm (csrc/sparse_common.h), by the kernel path (cpu_kernels.py):
- `amx`: csrc/sparse_attention_brgemm.cpp, whose matrix products run on the AMX tiles through our
  own micro-kernel (csrc/amx_gemm.h), or, on a CPU without AMX (a test forcing this kernel there),
  through oneDNN's brgemm (PyTorch's `at::native::cpublas::brgemm`);
- `avx512_bf16`: csrc/sparse_attention_bf16.cpp, our own AVX-512 BF16 micro-kernels. The brgemm
  kernel runs on these CPUs too (oneDNN falls back to AVX-512 BF16), but measured 0.66-1.11x of
  this one there (benchmarks/attention_kernels.py), so `auto` takes it only on AMX CPUs, where it measured 1.30-2.76x this one.
Each is compiled on first use with torch's extension builder (about 30 s, cached under
~/.cache/torch_extensions); a failed build falls back to the next kernel, then to PyTorch's
kernels, with one warning. HYBRIDLM_KERNEL=torch stays on PyTorch's kernels.
"""

from __future__ import annotations

import torch

from hybridlm.model.cpu_kernels import cpu_extension

_HEAD_DIMS = (32, 64, 128)


def brgemm_extension(paths: tuple[str, ...] = ("amx",)):
    """The brgemm kernel's module on the kernel paths `paths` (by default the AMX path only; tests
    also take it on avx512_bf16 CPUs), or None."""
    return cpu_extension("hybridlm_sparse_brgemm", "sparse_attention_brgemm.cpp", "AMX (brgemm) attention kernel",
                         paths)


def avx512_extension():
    """Our own AVX-512 BF16 kernel's module (on the avx512_bf16 and amx paths), or None."""
    return cpu_extension("hybridlm_sparse", "sparse_attention_bf16.cpp", "bf16 attention kernel", ("avx512_bf16",))


def _extension():
    """This path's kernel module, or None when none can be had here."""
    return brgemm_extension() or avx512_extension()


def dense_block() -> int:
    """The query block this path's kernel runs dense layers (window >= T) fastest with: its module's
    own measured choice (256 rows for the AMX kernel, 64 for the AVX-512 one)."""
    return _extension().dense_block


def kernel_applies(q: torch.Tensor) -> bool:
    """bf16 CPU tensors with a supported head dim, on a path with one of our kernels (amx, avx512_bf16)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-1] in _HEAD_DIMS
            and _extension() is not None)


class SparseAttentionBF16(torch.autograd.Function):
    """Exact sparse causal attention in one fused C++ kernel (forward and backward): this path's, or
    the compiled `kernel` module given (a test forcing one)."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, window: int, stride: int, block: int, kernel=None):
        kernel = kernel or _extension()
        B, H, n, D = q.shape
        flat = [t.reshape(B * H, -1, D).contiguous() for t in (q, k, v)]
        if k_global is None:
            k_global = v_global = q.new_zeros(B, H, 0, D)
        glob = [t.reshape(B * H, -1, D).contiguous() for t in (k_global, v_global)]
        out, lse = kernel.forward(*flat, *glob, window, stride, block)
        ctx.save_for_backward(*flat, *glob, out, lse)
        ctx.geometry = (B, H, window, stride, block)
        ctx.kernel = kernel
        return out.view(B, H, n, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kg, vg, out, lse = ctx.saved_tensors
        B, H, window, stride, block = ctx.geometry
        g = grad_out.reshape(B * H, -1, q.shape[-1]).contiguous().to(q.dtype)
        dq, dk, dv, dkg, dvg = ctx.kernel.backward(g, q, k, v, kg, vg, out, lse, window, stride, block)
        shape = (B, H, -1, q.shape[-1])
        glob = (dkg.view(shape).to(q.dtype), dvg.view(shape).to(q.dtype)) if kg.shape[1] else (None, None)
        return dq.view(shape), dk.view(shape), dv.view(shape), *glob, None, None, None, None


@torch.compiler.disable
def sparse_attention_bf16(q, k, v, k_global, v_global, window: int, stride: int, block: int) -> torch.Tensor:
    """Call the kernel; torch.compile leaves this call out of its graphs (it cannot trace C++)."""
    return SparseAttentionBF16.apply(q, k, v, k_global, v_global, window, stride, block)
