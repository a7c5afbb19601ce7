"""Layer patterns -> per-layer specs (attention kind, FFN kind), resolved once so no other module
branches on strings."""

from __future__ import annotations

from dataclasses import dataclass

from hybridlm.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """What one layer's attention sees, and whether its FFN is a mixture of experts."""

    sparse: bool
    window: int = 0
    stride: int = 0
    n_global: int = 0
    moe: bool = False


def resolve_layers(cfg: ModelConfig) -> list[LayerSpec]:
    """One spec per layer, bottom to top, from `cfg.layer_pattern` and `cfg.moe_pattern`."""
    ffn_kinds = cfg.moe_pattern or "F" * cfg.n_layer
    return [
        LayerSpec(sparse=True, window=cfg.window, stride=cfg.stride, n_global=cfg.n_global, moe=ffn == "M")
        if kind == "S"
        else LayerSpec(sparse=False, moe=ffn == "M")
        for kind, ffn in zip(cfg.layer_pattern, ffn_kinds)
    ]


def sparse_keys_per_query(spec: LayerSpec, position: int) -> int:
    """Keys a sparse query at 0-based `position` attends to (window + strided + global)."""
    local = min(spec.window, position + 1)
    far_end = position - spec.window + 1  # strided keys lie strictly before the window
    strided = max(far_end, 0) // spec.stride
    return local + strided + spec.n_global
