"""Device and precision choice: bf16 autocast where the hardware runs it natively."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=None)
def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo, its value (None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith(name)), None)
    return None if line is None else line.partition(":")[2].strip()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where it cannot be read)."""
    return _cpuinfo_field("model name") or "unknown"


def cpu_has_bf16() -> bool:
    """True when the CPU has AVX-512 BF16 or AMX (where bf16 matmul beats fp32)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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
