"""Which CPU kernel path runs, and the builder of our C++ extensions.

The path is chosen from the CPU's flags, the first of these the CPU can run:
- `amx` (AMX-BF16 tiles, Intel Xeon since Sapphire Rapids): training attention on oneDNN's brgemm
  micro-kernel (csrc/sparse_attention_brgemm.cpp), which runs its block matmuls on the tiles; the
  other kernels are the avx512_bf16 builds;
- `avx512_bf16`: all our C++ kernels (csrc/, built on first use): training attention and decoding;
- `avx2` (AVX2 + FMA, every x86-64 CPU since about 2013): the decode kernels, built for AVX2;
- `torch`: PyTorch's own kernels only.
HYBRIDLM_KERNEL forces one (`auto` or a path); forcing a path this CPU cannot run is refused in
one line that names the flags found, rather than dying on an illegal instruction. `bench` and
`eval efficiency` report the path that ran.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from hybridlm.device import cpu_flags, cpu_model
from hybridlm.errors import UserError

KERNEL_PATHS = ("amx", "avx512_bf16", "avx2", "torch")
"""Best first: `auto` takes the first one the CPU's flags allow."""
_AVX512_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
_NEEDS = {"amx": _AVX512_BF16 | {"amx_bf16", "amx_tile"}, "avx512_bf16": _AVX512_BF16, "avx2": {"avx2", "fma"},
          "torch": set()}
_BUILDS = {"amx": ("amx", "avx512_bf16"), "avx512_bf16": ("avx512_bf16",), "avx2": ("avx2",), "torch": ()}
"""The extension builds each path runs, best first: an AMX CPU also runs the avx512_bf16 builds."""
_AVX512_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_FLAGS = {"amx": _AVX512_FLAGS, "avx512_bf16": _AVX512_FLAGS, "avx2": ["-O3", "-mavx2", "-mfma", "-fopenmp"]}
SOURCES = Path(__file__).resolve().parents[1] / "csrc"
STALE_LOCK_S = 300
"""torch's build lock older than this is left over from a killed process (a build takes 30-80 s)."""
_lock = threading.Lock()
_built: dict[str, object] = {}  # by module name
_failed: set[str] = set()
_chosen: dict[tuple[str, tuple[str, ...], str], object] = {}  # (extension, paths, HYBRIDLM_KERNEL) -> module or None


def kernel_path(flags: frozenset[str] | None = None) -> str:
    """The CPU kernel path of this process: HYBRIDLM_KERNEL when set (checked against the CPU's
    `flags`, this CPU's by default), else the best one the flags allow."""
    flags = cpu_flags() if flags is None else flags
    forced = os.environ.get("HYBRIDLM_KERNEL", "auto")
    if forced == "auto":
        return next(path for path in KERNEL_PATHS if _NEEDS[path] <= flags)
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
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                                     "amx_int8"))
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


def cpu_extension(name: str, source: str, what: str, paths: tuple[str, ...]):
    """The compiled extension from csrc/`source` when this process's kernel path runs one of the
    builds `paths` (module `name`_BUILD, built once per process, cached on disk by torch), or None
    on other paths or when it cannot be built here (one warning, then PyTorch's kernels)."""
    key = (name, paths, os.environ.get("HYBRIDLM_KERNEL", "auto"))
    if key in _chosen:
        return _chosen[key]  # the per-call fast path: decided, and the path has not been forced away since
    build = next((b for b in _BUILDS[kernel_path()] if b in paths), None)
    module = None
    if build is not None:
        module_name = f"{name}_{build}"
        with _lock:
            if module_name not in _built and module_name not in _failed:
                built = _build(module_name, SOURCES / source, what, _FLAGS[build])
                if built is None:
                    _failed.add(module_name)
                else:
                    _built[module_name] = built
            module = _built.get(module_name)
    _chosen[key] = module
    return module


def _build(name: str, source: Path, what: str, flags: list[str]):
    try:
        from torch.utils.cpp_extension import load

        clear_stale_lock(name)
        venv_bin = str(Path(sys.executable).parent)  # where pip put ninja, when the venv is not activated
        if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        print(f"hybridlm: loading the {what} (the first time compiles it, 30-80 s)", file=sys.stderr, flush=True)
        # torch rebuilds when a source or a flag changes, not a header: the headers' digest is a flag
        headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))).hexdigest()[:16]
        return load(name, [str(source)], extra_cflags=[*flags, f"-DHYBRIDLM_HEADERS={headers}"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the portable path
        warnings.warn(f"the C++ {what} could not be built ({exc}); using PyTorch's kernels", stacklevel=2)
        return None
