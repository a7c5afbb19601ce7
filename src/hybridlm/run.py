"""Run directories: saving and loading model weights with hash-checked manifests.

A run directory (DESIGN.md section 4) holds config.json, tokenizer.json, model.safetensors,
metrics.jsonl, lineage.json, checkpoints/ and manifest.json, which records the sha256 of the
final files so a truncated or tampered model is refused instead of loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hybridlm.config import ModelConfig
from hybridlm.device import default_device, resolve_dtype
from hybridlm.errors import UserError
from hybridlm.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_file,
)
from hybridlm.model import HybridLM
from hybridlm.tensors import full_tensor
from hybridlm.tokenizer import TextTokenizer

MANIFEST = "manifest.json"


def weights_bytes(model: HybridLM) -> bytes:
    """The model's tensors as safetensors bytes; a tied output projection is stored once. Sharded
    (FSDP2) parameters are gathered, so every rank must call this."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return st_save({k: full_tensor(v).detach().contiguous().cpu() for k, v in state.items()})


def load_weights_bytes(model: HybridLM, data: bytes, where: Path) -> None:
    try:
        state = st_load(data)
    except SafetensorError as exc:
        raise UserError(f"{where} is not a readable safetensors file ({exc}); it may be truncated") from None
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("tok_emb.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where} does not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def write_manifest(directory: Path, names: list[str]) -> None:
    atomic_write_json(directory / MANIFEST, {name: sha256_file(directory / name) for name in names})


def verify_manifest(directory: Path) -> None:
    """Raise UserError when a file listed in manifest.json is missing or its hash differs."""
    manifest = read_json(directory / MANIFEST, "manifest")
    for name, digest in manifest.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} is missing; the run is incomplete")
        if sha256_file(path) != digest:
            raise UserError(f"{path} does not match its recorded sha256 (truncated or modified); retrain or restore it")


@dataclass
class LoadedRun:
    model: HybridLM
    tokenizer: TextTokenizer
    config: dict
    path: Path


def save_final(run_dir: Path, model: HybridLM, write: bool = True) -> None:
    """Write model.safetensors atomically and record it (with config and tokenizer) in the manifest.
    Every rank calls this (to gather sharded weights); only the one with `write` writes."""
    data = weights_bytes(model)
    if not write:
        return
    atomic_write_bytes(run_dir / "model.safetensors", data)
    write_manifest(run_dir, ["model.safetensors", "config.json", "tokenizer.json"])


def load_run(path: Path, dtype: str = "fp32") -> LoadedRun:
    """Open a finished run directory (or one checkpoint directory inside it), hashes checked.
    dtype "bf16" casts the weights for inference (fast decoding on bf16 CPUs)."""
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a hybridlm run directory (no config.json); train one with `hybridlm train`")
    run_dir = path if (path / "config.json").is_file() else path.parent.parent
    verify_manifest(path)
    config = read_json(run_dir / "config.json", "run config")
    model = HybridLM(ModelConfig(**config["model"]))
    load_weights_bytes(model, (path / "model.safetensors").read_bytes(), path / "model.safetensors")
    model.eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    return LoadedRun(model=model, tokenizer=TextTokenizer.load(run_dir / "tokenizer.json"), config=config, path=run_dir)


def load_run_on_device(path: Path, dtype: str = "auto") -> tuple[LoadedRun, str]:
    """Load a run for inference on the default device, in `dtype` resolved ("auto" is bf16 where the
    hardware runs it natively; weights are cast once); returns the run and the resolved dtype."""
    device = default_device()
    resolved = resolve_dtype(dtype, device)
    run = load_run(Path(path), resolved)
    run.model.to(device)
    return run, resolved
