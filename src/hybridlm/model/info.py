"""Size figures of a config without building its weights: parameters, FLOPs, KV cache, memory.

FLOPs count multiply-adds as 2; attention FLOPs use the keys each query actually attends to,
so sparse layers are counted at their true cost. KV-cache bytes are the keys and values the
last query of a context sees (dense: all of them; sparse: window + strided + global).
"""

from __future__ import annotations

import torch

from hybridlm.config import ModelConfig
from hybridlm.model.layout import LayerSpec, resolve_layers, sparse_keys_per_query
from hybridlm.model.transformer import HybridLM

ADAMW_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + two fp32 AdamW moments
ACTIVATION_BYTES_PER_TOKEN_PER_D = 34  # per layer, bf16, fused attention (Korthikanti et al., 2022)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding tables), tied weights counted once."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    return total, total - embeddings


def active_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, non-embedding parameters) one token uses: of each MoE layer, only its top_k
    routed experts (and the shared ones and the router) count."""
    total, non_embedding = count_params(cfg)
    expert = (2 + 1) * cfg.d_model * cfg.d_ff + (cfg.d_ff * 2 + cfg.d_model if cfg.bias else 0)  # SwiGLU up + down
    idle = sum(spec.moe for spec in resolve_layers(cfg)) * (cfg.n_experts - cfg.top_k) * expert
    return total - idle, non_embedding - idle


def _keys_seen(spec: LayerSpec, position: int) -> int:
    return sparse_keys_per_query(spec, position) if spec.sparse else position + 1


def _mean_keys(spec: LayerSpec, context: int) -> float:
    if not spec.sparse:
        return (context + 1) / 2
    return sum(sparse_keys_per_query(spec, p) for p in range(context)) / context


def flops_per_token(cfg: ModelConfig, context: int, specs: list[LayerSpec] | None = None) -> float:
    """Forward FLOPs per token, averaged over the positions of a full context."""
    specs = specs if specs is not None else resolve_layers(cfg)
    _, non_embedding = active_params(cfg)
    dense_matmuls = 2 * (non_embedding + cfg.vocab_size * cfg.d_model)  # blocks (active experts, routers) + LM head
    attention = sum(4 * cfg.d_model * _mean_keys(spec, context) for spec in specs)
    return dense_matmuls + attention


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int, specs: list[LayerSpec] | None = None) -> int:
    specs = specs if specs is not None else resolve_layers(cfg)
    per_key = 2 * cfg.n_kv_head * cfg.head_dim * dtype_bytes
    return sum(per_key * _keys_seen(spec, context - 1) for spec in specs)


def model_info(cfg: ModelConfig, context: int | None = None, dtype_bytes: int = 2) -> dict:
    """The figures `hybridlm model info` prints."""
    context = context or cfg.max_seq_len
    params, non_embedding = count_params(cfg)
    active, active_non_embedding = active_params(cfg)
    dense_specs = resolve_layers(cfg.all_dense())
    activations = ACTIVATION_BYTES_PER_TOKEN_PER_D * context * cfg.d_model * cfg.n_layer
    logits = 8 * context * cfg.vocab_size  # fp32 logits and their gradient
    return {
        "layer_pattern": cfg.layer_pattern,
        "context": context,
        "params": params,
        "params_non_embedding": non_embedding,
        "params_active": active,
        "params_active_non_embedding": active_non_embedding,
        "flops_per_token": flops_per_token(cfg, context),
        "flops_per_token_dense": flops_per_token(cfg, context, dense_specs),
        "kv_cache_bytes": kv_cache_bytes(cfg, context, dtype_bytes),
        "kv_cache_bytes_dense": kv_cache_bytes(cfg, context, dtype_bytes, dense_specs),
        "kv_cache_dtype_bytes": dtype_bytes,
        "train_memory_bytes": ADAMW_BYTES_PER_PARAM * params + activations + logits,
        "train_memory_note": "estimate for one sequence: 16 B/param (fp32 AdamW) + bf16 activations + fp32 logits",
    }
