"""Atomic, self-checking training checkpoints: `checkpoints/step_N/`.

Each holds model.safetensors, optimizer.safetensors (AdamW moments by parameter name, and the
torch RNG state), state.json (step, data position, optimizer hyper-parameters) and a manifest of
sha256 hashes. It is written under a temporary name and renamed into place, so a kill at any
moment leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes, atomic_write_json, read_json
from hybridlm.model import HybridLM
from hybridlm.run import (
    load_weights_bytes,
    verify_manifest,
    weights_bytes,
    write_manifest,
)
from hybridlm.tensors import canonical, full_tensor, tensor_parallel_layout
from hybridlm.train.distributed import shard_like

FILES = ["model.safetensors", "optimizer.safetensors", "state.json"]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run_dir: Path, step: int, model: HybridLM, optimizer: torch.optim.Optimizer, state: dict, keep: int,
    write: bool = True,
) -> Path:
    """Gather full weights and moments (every rank calls this: sharded tensors are collected), then
    write them, on the rank with `write`, in the single-process format that any world size loads."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    weights, moments = weights_bytes(model), st_save(_optimizer_tensors(model, optimizer))
    if not write:
        return final
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_bytes(tmp / "model.safetensors", weights)
    atomic_write_bytes(tmp / "optimizer.safetensors", moments)
    atomic_write_json(tmp / "state.json", {**state, "step": step, "param_groups": _group_hparams(optimizer)})
    write_manifest(tmp, FILES)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose hashes check out; broken ones are skipped with a warning."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_manifest(path)
            return path
        except UserError as exc:
            warnings.warn(f"skipping checkpoint {path.name}: {exc}", stacklevel=2)
    return None


def load_checkpoint_weights(path: Path, model: HybridLM) -> dict:
    """Restore the weights (before the model is wrapped or sharded); return state.json."""
    load_weights_bytes(model, (path / "model.safetensors").read_bytes(), path / "model.safetensors")
    return read_json(path / "state.json", "checkpoint state")


def load_optimizer_state(path: Path, model: HybridLM, optimizer: torch.optim.Optimizer) -> None:
    """Restore AdamW moments (sharded like their parameters), hyper-parameters and the RNG."""
    tensors = st_load((path / "optimizer.safetensors").read_bytes())
    state = read_json(path / "state.json", "checkpoint state")
    torch.set_rng_state(tensors.pop("rng.torch"))
    for name, param in model.named_parameters():
        keys = {k.rpartition("/")[2]: v for k, v in tensors.items() if k.rpartition("/")[0] == name}
        if keys:
            optimizer.state[param] = {k: v if k == "step" else shard_like(param, tensor_parallel_layout(param, v))
                                      for k, v in keys.items()}
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved)


def _optimizer_tensors(model: HybridLM, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {"rng.torch": torch.get_rng_state()}
    for param, slots in optimizer.state.items():
        for key, value in slots.items():
            tensors[f"{names[id(param)]}/{key}"] = canonical(param, full_tensor(value)).detach().clone().cpu()
    return tensors


def _group_hparams(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The JSON-able settings of each param group (lr, betas, ...), without the params."""
    keep = ("lr", "betas", "eps", "weight_decay")
    return [{k: g[k] for k in keep if k in g} for g in optimizer.param_groups]
