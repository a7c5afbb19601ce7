"""Device and precision choice: bf16 autocast where the hardware runs it natively."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has AVX-512 BF16 or AMX (where bf16 matmul beats fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 support or a bf16-capable CPU, else 'fp32'."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32) or a no-op for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
