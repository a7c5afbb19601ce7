"""LoRA adapters on the model's Linear layers, through Hugging Face `peft`.

peft's `inject_adapter_in_model` attaches LoRA to any `nn.Module` in place (it documents plain
modules, not only transformers models), so the model stays a HybridLM with the same forward, and
the adapters are peft's own layers: what we save is exactly what peft loads, and its dropout,
scaling and initialisation are the reference ones rather than a copy. Only adapter weights (and a
fresh reward head, as peft's modules_to_save) train and are saved. Saved adapters use peft's file
format (adapter_config.json + adapter_model.safetensors, tensor names `base_model.model.<module>`),
whose module names are those of our remote Hugging Face export, so `PeftModel.from_pretrained` puts
them on an exported base.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hybridlm.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(kw_only=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    extra_trained: list[str] = field(default_factory=list)
    """Whole modules trained and saved besides the adapters (a reward model's fresh head)."""


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'hybridlm[align]'") from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name (as the whole name or its dotted end) at least one Linear layer."""
    names = linear_names(model)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            kinds = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in names})
            raise UserError(f"lora.targets {target!r} matches no Linear layer; the model has {', '.join(kinds)}")


def peft_config(settings: LoraSettings, base: str = ""):
    return _peft().LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                              target_modules=list(settings.targets), modules_to_save=list(settings.extra_trained) or None,
                              base_model_name_or_path=base or None, task_type="CAUSAL_LM")


def attach_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Add adapters in place (B = 0, so outputs are unchanged until training moves them); freeze the rest."""
    check_targets(model, settings.targets)
    _peft().inject_adapter_in_model(peft_config(settings), model)
    return model


def inject_saved_adapter(model: nn.Module, directory: Path, name: str, state: dict[str, torch.Tensor]) -> None:
    """Attach the adapters saved in `directory` under `name`, beside any already there (serving
    several on one base); `state` is its adapter_model.safetensors."""
    peft = _peft()
    config = peft.LoraConfig.from_pretrained(str(directory))
    with warnings.catch_warnings():  # "multiple adapters in the model": what serving several means
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    result = peft.set_peft_model_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()},
                                            adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{directory} holds tensors for modules this model lacks: {result.unexpected_keys[:3]}")


def tuner_layers(model: nn.Module) -> list:
    """The layers that carry adapters (empty for a plain model, without importing peft: that takes
    about 2 s, and every server and scheduler start asks)."""
    if not has_lora(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def use_adapter(layers: list, name: str | None) -> None:
    """Make `name` the one adapter these layers apply (None: the base model alone). A layer without
    that adapter (another adapter's targets) applies none."""
    for layer in layers:
        layer.enable_adapters(name is not None)
        if name is not None:
            layer.set_adapter(name)


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under peft's saved names (adapter name left out), without the prefix."""
    return _peft().get_peft_model_state_dict(model)


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise UserError(f"{where} does not hold this run's adapters (missing {sorted(expected - set(state))[:3]}, "
                        f"unexpected {sorted(set(state) - expected)[:3]})")
    _peft().set_peft_model_state_dict(model, state)


def write_adapter_config(directory: Path, settings: LoraSettings, base: str) -> None:
    from hybridlm.fileio import atomic_write_json

    doc = json.loads(json.dumps(peft_config(settings, base).to_dict(), default=sorted))
    atomic_write_json(directory / ADAPTER_CONFIG, doc)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's outputs, from the same weights: the reference of a LoRA policy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain model of the same config with every adapter folded in (decodes at the base's speed)."""
    merged = type(model)(model.cfg).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    missing, unexpected = merged.load_state_dict(merged_state(model), strict=False)
    if missing or unexpected:
        raise UserError(f"merging the adapters left weights unmatched (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return merged.eval()


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state with every adapter folded in: W + scaling * B @ A per layer (computed
    here, not by peft, so a test of merged against unmerged outputs checks peft's forward too)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            state[f"{name}.weight"] = (base.weight + delta).detach()
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach()
    for key, value in model.state_dict().items():
        plain = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if "lora_" not in key and ".original_module." not in key and plain not in state:
            state[plain] = value
    return state
