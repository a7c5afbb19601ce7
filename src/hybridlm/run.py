"""Run directories: saving and loading model weights with hash-checked manifests.

A run directory (DESIGN.md section 4) holds config.json, tokenizer.json, model.safetensors,
metrics.jsonl, lineage.json, checkpoints/ and manifest.json, which records the sha256 of the
final files so a truncated or tampered model is refused instead of loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
from hybridlm.model.converters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraSettings,
    adapter_state,
    attach_lora,
    has_lora,
    inject_saved_adapter,
    load_adapter_state,
    write_adapter_config,
)
from hybridlm.model.converters.quant import EMBEDDING_TENSORS, empty_quantized, is_quantized
from hybridlm.tensors import canonical, full_tensor
from hybridlm.tokenizer import TextTokenizer

MANIFEST = "manifest.json"


def weights_bytes(model: HybridLM) -> bytes:
    """The model's tensors as safetensors bytes; a tied output projection is stored once; of a
    model with LoRA adapters, only what trains (the base stays in its own run); of a quantized one,
    the embeddings in bf16. Sharded (FSDP2)
    parameters are gathered (and tensor-parallel ones put back in row order), so every rank must call this."""
    if has_lora(model):
        state = adapter_state(model)
    else:
        state = model.state_dict(keep_vars=True)  # the parameters themselves: tensor parallelism marks them
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight")
    if is_quantized(model):  # see converters/quant.py: its embeddings are kept in bf16
        state = {k: v.to(torch.bfloat16) if k in EMBEDDING_TENSORS else v for k, v in state.items()}
    return st_save({k: canonical(v, full_tensor(v)).detach().contiguous().cpu() for k, v in state.items()})


def load_weights_bytes(model: HybridLM, data: bytes, where: Path) -> None:
    try:
        state = st_load(data)
    except SafetensorError as exc:
        raise UserError(f"{where} is not a readable safetensors file ({exc}); it may be truncated") from None
    if has_lora(model):
        load_adapter_state(model, state, where)
        return
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


def save_final(run_dir: Path, model: HybridLM, write: bool = True, lora: LoraSettings | None = None,
               base: Path | None = None) -> None:
    """Write model.safetensors atomically and record it (with config and tokenizer) in the manifest;
    with LoRA, the adapters in peft's format instead, stamped with the base weights' hash. Every
    rank calls this (to gather sharded weights); only the one with `write` writes."""
    if lora is None:
        data = weights_bytes(model)
        if write:
            atomic_write_bytes(run_dir / "model.safetensors", data)
            write_manifest(run_dir, ["model.safetensors", "config.json", "tokenizer.json"])
        return
    stamp = {"format": "pt", "base_weights_sha256": weights_sha256(base)}
    data = st_save({PEFT_PREFIX + k: full_tensor(v).detach().contiguous().cpu() for k, v in adapter_state(model).items()},
                   metadata=stamp)
    if write:
        atomic_write_bytes(run_dir / ADAPTER_WEIGHTS, data)
        write_adapter_config(run_dir, lora, str(base))
        write_manifest(run_dir, [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json", "tokenizer.json"])


def final_weights(run_dir: Path) -> Path | None:
    """The finished weights of a run: model.safetensors, or a LoRA run's adapters; None if unfinished."""
    for name in ("model.safetensors", ADAPTER_WEIGHTS):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def weights_sha256(run_dir: Path) -> str:
    """The recorded hash of a finished run's weights (a LoRA run: of its adapters and its base's)."""
    manifest = read_json(Path(run_dir) / MANIFEST, "manifest")
    if "model.safetensors" in manifest:
        return manifest["model.safetensors"]
    if ADAPTER_WEIGHTS in manifest:
        return manifest[ADAPTER_WEIGHTS] + "+" + _adapter_base_sha(Path(run_dir) / ADAPTER_WEIGHTS)
    raise UserError(f"{run_dir} has no finished weights (model.safetensors); finish or retrain it")


def _adapter_base_sha(path: Path) -> str:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("base_weights_sha256", "")


def load_run(path: Path, dtype: str = "fp32") -> LoadedRun:
    """Open a finished run directory (or one checkpoint directory inside it), hashes checked.
    dtype "bf16" casts the weights for inference (fast decoding on bf16 CPUs)."""
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a hybridlm run directory (no config.json); train one with `hybridlm train`")
    run_dir = path if (path / "config.json").is_file() else path.parent.parent
    verify_manifest(path)
    config = read_json(run_dir / "config.json", "run config")
    lora = config.get("lora", {}).get("r", 0)
    if quantization := config.get("quantization"):
        model = _quantized_model(ModelConfig(**config["model"]), quantization)
    else:
        model = _lora_model(run_dir, config) if lora else HybridLM(ModelConfig(**config["model"]))
    weights = path / ("model.safetensors" if not lora or path != run_dir else ADAPTER_WEIGHTS)
    load_weights_bytes(model, weights.read_bytes(), weights)
    model.eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    return LoadedRun(model=model, tokenizer=TextTokenizer.load(run_dir / "tokenizer.json"), config=config, path=run_dir)


def _quantized_model(cfg: ModelConfig, quantization: dict) -> HybridLM:
    """A quantized run's model, its codes still to be loaded, built on the meta device so the fp32
    weights of the layers it quantizes are never allocated (they would stay in the process's peak
    memory)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
        empty_quantized(model, quantization["layers"], quantization["to"], quantization["group_size"] or 0)
    model.to_empty(device="cpu")
    model.fill_position_tables()
    return model


def _lora_model(run_dir: Path, config: dict) -> HybridLM:
    """The base run's model (its hash checked against the one the adapters were trained on) with
    this run's adapters attached, still untrained."""
    base_dir = Path(config["train"]["init_from"])
    adapters = run_dir / ADAPTER_WEIGHTS
    if adapters.is_file():
        trained_on, found = _adapter_base_sha(adapters), weights_sha256(base_dir)
        if trained_on != found:
            raise UserError(f"the LoRA adapters of {run_dir} were trained on other base weights than {base_dir} "
                            f"holds now (sha256 {trained_on[:12]} vs {found[:12]}); restore that base or retrain")
    base = load_run(base_dir).model
    if has_lora(base):
        raise UserError(f"{base_dir}, the base of {run_dir}, has adapters itself; `hybridlm lora merge` it first")
    model = HybridLM(ModelConfig(**config["model"]))
    missing, _ = model.load_state_dict(base.state_dict(), strict=False)
    if any(not name.startswith("reward_head.") for name in missing):
        raise UserError(f"{base_dir} does not match the model of {run_dir}")
    return attach_lora(model, lora_settings(config))


def lora_settings(config: dict) -> LoraSettings:
    """The adapters a run config's [lora] section asks for (a reward model trains its head whole)."""
    section = config["lora"]
    extra = ["reward_head"] if config["model"].get("head") == "reward" else []
    return LoraSettings(r=section["r"], alpha=section["alpha"], dropout=section["dropout"],
                        targets=list(section["targets"]), extra_trained=extra)


def attach_served_adapter(model: HybridLM, served: Path, adapter_run: Path, name: str,
                          tokenizer: TextTokenizer) -> None:
    """Put the adapters of LoRA run `adapter_run` on the served base `model` (run `served`) under
    `name`; refused unless they were trained on exactly these base weights and this tokenizer."""
    weights = Path(adapter_run) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"adapter {name}: {adapter_run} is not a LoRA run (no {ADAPTER_WEIGHTS}); train one with lora.r > 0")
    verify_manifest(Path(adapter_run))
    trained_on, served_sha = _adapter_base_sha(weights), weights_sha256(served)
    if trained_on != served_sha:
        raise UserError(f"adapter {name}: {adapter_run} was trained on other base weights (sha256 {trained_on[:12]}) "
                        f"than the served model {served} ({served_sha[:12]}); serve its own base")
    if TextTokenizer.load(Path(adapter_run) / "tokenizer.json").sha256() != tokenizer.sha256():
        raise UserError(f"adapter {name}: {adapter_run} uses another tokenizer than the served model")
    dtype = next(model.parameters()).dtype
    inject_saved_adapter(model, Path(adapter_run), name, st_load(weights.read_bytes()))
    model.to(dtype)


def load_run_on_device(path: Path, dtype: str = "auto") -> tuple[LoadedRun, str]:
    """Load a run for inference on the default device, in `dtype` resolved ("auto" is bf16 where the
    hardware runs it natively; weights are cast once); returns the run and the resolved dtype."""
    device = default_device()
    resolved = resolve_dtype(dtype, device)
    run = load_run(Path(path), resolved)
    run.model.to(device)
    return run, resolved
