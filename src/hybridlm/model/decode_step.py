"""The fused decode step: every layer of a bf16 decode step in one C++ call (csrc/decode_bf16.cpp).

Why: at GPT-2-small widths the kernels of a decode step took under half of it when Python drove
each op (about 70 module calls and 400 small aten ops per step: 2.3 ms a step, 0.9 ms of it in the
kernels, on an AVX-512 BF16 CPU). The plan holds the model's own weight tensors (nothing copied);
a step hands it each layer's cache buffers and gets the logits back. The caches keep their Python
bookkeeping (sparse layers' rolling run and strided store), so prefix caching and the unfused path
read them as before.

It applies to bf16 CPU models in eval mode without autograd: every projection a
`transformer.Linear` or a weight-only int8/int4 `QuantizedLinear` (the kernels read its codes and
scales as stored), LayerNorm or RMSNorm, dense FFNs, no hooks (analysis probes, tensor
parallelism), at most MAX_ROWS rows. Anything else (LoRA layers, mixtures of experts, fp32) takes
the module path, which gives the same numbers up to rounding order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from hybridlm.model.decode_kernel_bf16 import ACTIVATION_CODES, MAX_ROWS, decode_extension


def _weights_ok(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype is torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
                             and not isinstance(t, DTensor)) for t in tensors)


def _linear_tensors(layer: nn.Module) -> list[torch.Tensor | None] | None:
    """(weight, scales, zeros, bias) of a Linear or weight-only quantized layer as the plan reads
    them, or None for any other layer or one whose tensors it cannot read."""
    from hybridlm.model.converters.quant import QuantizedLinear
    from hybridlm.model.transformer import Linear

    if type(layer) is Linear:
        tensors = [layer.weight, None, None, layer.bias]
        return tensors if _weights_ok(layer.weight, layer.bias) else None
    if type(layer) is not QuantizedLinear:
        return None
    zeros = layer.zeros if layer.kind == "int4" else None
    if not (_weights_ok(layer.scales, zeros, layer.bias) and layer.qweight.device.type == "cpu"
            and layer.qweight.is_contiguous()):
        return None
    return [layer.qweight, layer.scales, zeros, layer.bias]


def _hooked(model: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def build_plan(model: nn.Module):
    """The C++ DecodePlan over `model`'s weights, or None where the fused step does not apply
    (see the module docstring) or the decode kernels cannot be built here."""
    from hybridlm.model.transformer import FeedForward, LayerNorm, Linear, RMSNorm

    extension = decode_extension()
    norm_types = (LayerNorm, RMSNorm)
    if extension is None or _hooked(model) or type(model.norm_f) not in norm_types or type(model.lm_head) is not Linear:
        return None
    rms = isinstance(model.norm_f, RMSNorm)
    layers, acts = [], []
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        norms = (block.norm1, block.norm2)
        if (type(ffn) is not FeedForward
                or any(type(n) is not type(model.norm_f) or n.eps != model.norm_f.eps for n in norms)):
            return None
        linears = [_linear_tensors(m) for m in (attn.qkv, attn.proj, ffn.up, ffn.down)]
        others = [block.norm1.weight, getattr(block.norm1, "bias", None), block.norm2.weight,
                  getattr(block.norm2, "bias", None), attn.k_global, attn.v_global]
        if any(t is None for t in linears) or not _weights_ok(*others):
            return None
        qkv, proj, up, down = linears
        tensors = [*others[:2], *qkv, *proj, *others[2:4], *up, *down, *others[4:]]
        layers.append([None if t is None else t.detach() for t in tensors])
        acts.append(ACTIVATION_CODES["swiglu" if ffn.gated else "gelu_tanh"])
    final = (model.norm_f.weight, getattr(model.norm_f, "bias", None), model.lm_head.weight)
    if not _weights_ok(*final) or model.norm_f.eps is None:
        return None
    rotary = model.blocks[0].attn.rotary if len(model.blocks) else None
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary.cos_TF.float().contiguous(), rotary.sin_TF.float().contiguous()
    cfg = model.cfg
    return extension.DecodePlan(layers, acts, rms, model.norm_f.eps, *(None if t is None else t.detach() for t in final),
                                cos, sin, cfg.n_head, cfg.n_kv_head, cfg.head_dim)


def fused_logits(model: nn.Module, ids_B1: torch.Tensor, positions: list[int], caches: list) -> torch.Tensor | None:
    """Logits (B, vocab) of one decode step through the plan of caches[0] (a `ModelCache`, whose
    plan is built on its first step), or None where the fused step does not apply: the caller
    then runs the modules. `caches` holds one ModelCache per row, or one for all rows (a batch
    decoded together)."""
    if ids_B1.shape[0] > MAX_ROWS or model.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    plan = caches[0].plan_for(model, build_plan)
    if plan is None:
        return None
    groups = []
    for layer in range(len(model.blocks)):
        slots = [cache[layer].decode_slot() for cache in caches]
        if any(slot is None for slot in slots):
            return None
        groups.append(slots)
    x_BC = model.embed(ids_B1, torch.tensor(positions, device=ids_B1.device)[:, None])[:, 0]
    logits_BV = plan.step(x_BC, positions, groups)
    for cache in caches:
        for layer_cache in cache:
            layer_cache.commit_slot()
    return logits_BV
