"""The C++ sparse attention kernel for CPUs with AVX-512 BF16 (csrc/sparse_attention_bf16.cpp).

It is compiled on first use with torch's extension builder (about 30 s, cached under
~/.cache/torch_extensions) and used for bf16 whole-sequence attention when the CPU has
avx512_bf16. Set HYBRIDLM_NO_CPP_KERNEL=1 to stay on the PyTorch-kernel path; a failed build
falls back to it with one warning.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from hybridlm.device import cpu_has_bf16

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "sparse_attention_bf16.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_HEAD_DIMS = (32, 64, 128)
_lock = threading.Lock()
_state: dict = {}


def _extension():
    """The compiled module, or None when it cannot be had here."""
    with _lock:
        if "ext" not in _state:
            _state["ext"] = _build()
        return _state["ext"]


STALE_LOCK_S = 300
"""torch's build lock older than this is left over from a killed process (a build takes ~30 s)."""


def clear_stale_lock(name: str) -> bool:
    """Remove the extension's build lock when it is stale; returns whether one was removed. torch
    takes that lock (a plain file) on every first load in a process, and a process that exits or
    is killed meanwhile leaves it behind: every later load would then wait on it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        warnings.warn(f"removing a stale build lock {lock} (left by a process that stopped while loading the "
                      "kernel)", stacklevel=2)
        lock.unlink(missing_ok=True)
        return True
    return False


def _build():
    if os.environ.get("HYBRIDLM_NO_CPP_KERNEL") or not cpu_has_bf16():
        return None
    try:
        from torch.utils.cpp_extension import load

        clear_stale_lock("hybridlm_sparse_bf16")

        venv_bin = str(Path(sys.executable).parent)  # where pip put ninja, when the venv is not activated
        if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        print("hybridlm: loading the bf16 attention kernel (the first time compiles it, about 30 s)",
              file=sys.stderr, flush=True)
        return load("hybridlm_sparse_bf16", [str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the portable path
        warnings.warn(f"the C++ sparse attention kernel could not be built ({exc}); using the PyTorch path",
                      stacklevel=2)
        return None


def kernel_applies(q: torch.Tensor) -> bool:
    """bf16 CPU tensors with a supported head dim, on a CPU where the kernel builds."""
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
