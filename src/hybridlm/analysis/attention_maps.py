"""Every layer's attention probabilities, written out explicitly for analysis.

The model never materialises them (the sparse kernels compute softmax(QK^T)V block by block), so
this module captures each attention layer's input with a forward pre-hook, recomputes q and k
(RoPE included), and applies the layer's visibility rule as an explicit mask: causal for dense
layers; for sparse ones, the local window, the strided summary columns and the learned global
slots, which every query sees. A map is (heads, T, n_global + T): the global slots' columns
first, then the T positions. `layer_outputs` checks a map against the layer's real output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridlm.model import HybridLM
from hybridlm.model.layout import LayerSpec


@dataclass
class LayerMap:
    layer: int
    spec: LayerSpec
    probs_HTK: torch.Tensor
    """(heads, T, n_global + T) in fp32; rows sum to 1."""

    @property
    def n_global(self) -> int:
        return self.probs_HTK.shape[2] - self.probs_HTK.shape[1]


def visible_mask(spec: LayerSpec, length: int) -> torch.Tensor:
    """(T, T) booleans: may query i attend to position j (global slots not included)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = j <= i
    if not spec.sparse:
        return causal
    return causal & ((j > i - spec.window) | ((j + 1) % spec.stride == 0))


def _layer_keys(attn, x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (H, T, D), and the keys and values every query may see, globals first: (H, G + T, D)."""
    q, k, v = attn.heads(x_BTC)
    if attn.rotary is not None:
        q, k = attn.rotary(q, 0), attn.rotary(k, 0)
    repeat = attn.n_head // attn.n_kv_head
    k, v = k[0].repeat_interleave(repeat, 0), v[0].repeat_interleave(repeat, 0)
    if attn.k_global is not None:
        k = torch.cat([attn.k_global.to(k.dtype).repeat_interleave(repeat, 0), k], 1)
        v = torch.cat([attn.v_global.to(v.dtype).repeat_interleave(repeat, 0), v], 1)
    return q[0].float(), k.float(), v.float()


def _probabilities(spec: LayerSpec, q_HTD: torch.Tensor, k_HKD: torch.Tensor) -> torch.Tensor:
    length = q_HTD.shape[1]
    n_global = k_HKD.shape[1] - length
    scores = q_HTD @ k_HKD.transpose(1, 2) / math.sqrt(q_HTD.shape[-1])
    mask = torch.cat([torch.ones(length, n_global, dtype=torch.bool), visible_mask(spec, length)], 1)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _captured_inputs(model: HybridLM, ids_1T: torch.Tensor) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
             for block in model.blocks]
    try:
        with torch.no_grad():
            model(ids_1T)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def attention_maps(model: HybridLM, ids_1T: torch.Tensor) -> list[LayerMap]:
    """One map per layer for a single sequence (batch 1), in fp32 whatever the model's dtype."""
    maps = []
    with torch.no_grad():
        for layer, (block, x) in enumerate(zip(model.blocks, _captured_inputs(model, ids_1T))):
            q, k, _ = _layer_keys(block.attn, x)
            maps.append(LayerMap(layer, block.attn.spec, _probabilities(block.attn.spec, q, k)))
    return maps


def layer_outputs(model: HybridLM, ids_1T: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(explicit maps times values, the layer's own attention output), both (H, T, D) fp32, per layer:
    equal when the maps are the ones the model computes."""
    pairs = []
    with torch.no_grad():
        for block, x in zip(model.blocks, _captured_inputs(model, ids_1T)):
            attn = block.attn
            q, k, v = _layer_keys(attn, x)
            explicit = _probabilities(attn.spec, q, k) @ v
            q_real, k_real, v_real = attn.heads(x)
            if attn.rotary is not None:
                q_real, k_real = attn.rotary(q_real, 0), attn.rotary(k_real, 0)
            pairs.append((explicit, attn.attend(q_real, k_real, v_real, None, True)[0].float()))
    return pairs
