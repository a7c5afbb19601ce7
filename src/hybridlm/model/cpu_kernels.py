"""Which CPU kernel path runs, and the builder of our C++ extensions.

The path is chosen from the CPU's flags: `avx512_bf16` (our C++ kernels, csrc/, built on first
use) where the CPU has AVX-512 BF16, else `torch` (PyTorch's own kernels). HYBRIDLM_KERNEL forces
one (`auto`, `avx512_bf16`, `torch`); forcing a path this CPU cannot run is refused in one line
that names the flags found, rather than dying on an illegal instruction. `bench` and
`eval efficiency` report the path that ran. There is no AMX path of our own yet: on AMX CPUs the
AVX-512 BF16 kernels run, and PyTorch's matmuls and SDPA use AMX through oneDNN.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

from hybridlm.device import cpu_flags, cpu_model
from hybridlm.errors import UserError

KERNEL_PATHS = ("avx512_bf16", "torch")
_NEEDS = {"avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, "torch": set()}
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
SOURCES = Path(__file__).resolve().parents[1] / "csrc"
STALE_LOCK_S = 300
"""torch's build lock older than this is left over from a killed process (a build takes ~30 s)."""
_lock = threading.Lock()
_built: dict[str, object] = {}
_failed: set[str] = set()


def kernel_path(flags: frozenset[str] | None = None) -> str:
    """The CPU kernel path of this process: HYBRIDLM_KERNEL when set (checked against the CPU's
    `flags`, this CPU's by default), else the best one the flags allow."""
    flags = cpu_flags() if flags is None else flags
    forced = os.environ.get("HYBRIDLM_KERNEL", "auto")
    if forced == "auto":
        return "avx512_bf16" if _NEEDS["avx512_bf16"] <= flags else "torch"
    if forced == "amx":
        raise UserError("HYBRIDLM_KERNEL=amx: hybridlm has no AMX kernel of its own yet (on AMX CPUs the avx512_bf16 "
                        "path runs, and PyTorch's matmuls use AMX); set HYBRIDLM_KERNEL to auto, avx512_bf16 or torch")
    if forced not in KERNEL_PATHS:
        raise UserError(f"HYBRIDLM_KERNEL={forced!r} is not a kernel path; use auto, {', '.join(KERNEL_PATHS)}")
    missing = _NEEDS[forced] - flags
    if missing:
        simd = " ".join(sorted(f for f in flags if f.startswith(("avx", "amx")))) or "none"
        raise UserError(f"HYBRIDLM_KERNEL={forced} needs the CPU flags {' '.join(sorted(missing))}, which this CPU "
                        f"lacks (its SIMD flags: {simd}); unset HYBRIDLM_KERNEL or set it to torch")
    return forced


def machine() -> dict:
    """What a speed figure ran on: the CPU model, the SIMD flags that pick a path, and the path."""
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"))
    return {"cpu": cpu_model(), "cpu_flags": " ".join(flags), "kernel_path": kernel_path()}


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


def avx512_extension(name: str, source: str, what: str):
    """The compiled extension `name` from csrc/`source` on the avx512_bf16 path (built once per
    process, cached on disk by torch), or None on the torch path or when it cannot be built here
    (one warning, then PyTorch's kernels)."""
    if name in _built and os.environ.get("HYBRIDLM_KERNEL", "auto") in ("auto", "avx512_bf16"):
        return _built[name]  # the per-call fast path: built, and the path has not been forced away since
    if kernel_path() != "avx512_bf16":
        return None
    with _lock:
        if name not in _built and name not in _failed:
            module = _build(name, SOURCES / source, what)
            if module is None:
                _failed.add(name)
            else:
                _built[name] = module
        return _built.get(name)


def _build(name: str, source: Path, what: str):
    try:
        from torch.utils.cpp_extension import load

        clear_stale_lock(name)
        venv_bin = str(Path(sys.executable).parent)  # where pip put ninja, when the venv is not activated
        if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        print(f"hybridlm: loading the {what} (the first time compiles it, about 30 s)", file=sys.stderr, flush=True)
        return load(name, [str(source)], extra_cflags=_FLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the portable path
        warnings.warn(f"the C++ {what} could not be built ({exc}); using PyTorch's kernels", stacklevel=2)
        return None
