"""Size figures: parameter counts against published models, sparsity reflected in FLOPs and KV cache."""

from __future__ import annotations

from hybridlm.config import preset
from hybridlm.model import HybridLM
from hybridlm.model.info import count_params, kv_cache_bytes, model_info


def test_gpt2_preset_has_gpt2_parameter_count():
    # GPT-2 small as published by OpenAI / Hugging Face: 124,439,808 parameters (tied head).
    assert count_params(preset("gpt2-124m"))[0] == 124_439_808


def test_param_count_matches_the_built_model():
    cfg = preset("tiny")
    assert count_params(cfg)[0] == sum(p.numel() for p in HybridLM(cfg).parameters())


def test_sparse_layers_cost_less_than_dense_at_long_context():
    info = model_info(preset("small"), context=16384)
    assert info["flops_per_token"] < info["flops_per_token_dense"]
    # 2 dense layers keep 16384 keys; 4 sparse keep 128 + 127 strided + 8 global.
    per_key = 2 * 6 * 64 * 2
    assert info["kv_cache_bytes"] == per_key * (2 * 16384 + 4 * (128 + 127 + 8))
    assert info["kv_cache_bytes_dense"] == per_key * 6 * 16384


def test_short_context_sparse_equals_dense_keys_plus_globals():
    cfg = preset("small")
    assert kv_cache_bytes(cfg, 64, 2) == kv_cache_bytes(cfg.all_dense(), 64, 2) + 4 * 8 * 2 * 6 * 64 * 2
