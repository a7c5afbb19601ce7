"""lineage.json: where a run came from (data and its hashes, tokenizer, code and library versions)."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hybridlm import __version__

_LIBRARIES = ("torch", "numpy", "tokenizers", "safetensors")


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def lineage_record(sources: list[dict], tokenizer_sha256: str, parent_run: str | None = None) -> dict:
    """`sources`: one record per training source (spec, weight, hashes, tokens drawn)."""
    return {
        "sources": sources,
        "tokenizer_sha256": tokenizer_sha256,
        "parent_run": parent_run,
        "code_version": code_version(),
        "libraries": _library_versions(),
    }
