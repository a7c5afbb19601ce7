"""Configuration of an exported hybridlm model, for Hugging Face transformers (remote code).

Copied into the directory that `hybridlm export hf --format remote` writes. It imports only
transformers (and packaging, which transformers needs), so the directory loads where hybridlm is
not installed; an older transformers than the tested floor is refused here, in one line. The fields mirror
hybridlm's ModelConfig; `tie_word_embeddings` is its `tie_embeddings` under the name
transformers expects.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

TRANSFORMERS_FLOOR = "4.56.0"
"""The oldest transformers release the export is tested on (DynamicCache(config=...), the cache
arguments generate() passes); pyproject's [hf] extra declares the same floor."""

if Version(transformers.__version__) < Version(TRANSFORMERS_FLOOR):  # before anything fails deeper down
    raise ImportError(f"this hybridlm export needs transformers>={TRANSFORMERS_FLOOR} (found {transformers.__version__}); "
                      f"upgrade it: pip install 'transformers>={TRANSFORMERS_FLOOR}'")


class HybridLMConfig(PretrainedConfig):
    """Shape and attention layout: layer_pattern holds one letter per layer, D (dense causal) or
    S (sparse: a local window, every stride-th position, and n_global learned key/value slots)."""

    model_type = "hybridlm"
    attribute_map = {  # noqa: RUF012 - a plain class attribute: an annotation would make it a dataclass field
        "hidden_size": "d_model",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 4096,
        n_layer: int = 6,
        n_head: int = 6,
        n_kv_head: int = 6,
        d_model: int = 384,
        d_ff: int = 1024,
        max_seq_len: int = 1024,
        layer_pattern: str = "DDSSSS",
        window: int = 128,
        stride: int = 128,
        n_global: int = 8,
        position: str = "rope",
        rope_theta: float = 10000.0,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        ffn: str = "swiglu",
        moe_pattern: str = "",
        n_experts: int = 8,
        num_experts_per_tok: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        n_shared_experts: int = 0,
        moe_balance: str = "aux",
        bias: bool = False,
        dropout: float = 0.0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        # The base class first: some transformers versions give tie_word_embeddings and the token
        # ids defaults there, which must not overwrite ours.
        super().__init__(**kwargs)
        self.vocab_size, self.n_layer, self.n_head, self.n_kv_head = vocab_size, n_layer, n_head, n_kv_head
        self.d_model, self.d_ff, self.max_seq_len = d_model, d_ff, max_seq_len
        self.layer_pattern, self.window, self.stride, self.n_global = layer_pattern, window, stride, n_global
        self.position, self.rope_theta = position, rope_theta
        self.norm, self.norm_eps, self.ffn, self.bias, self.dropout = norm, norm_eps, ffn, bias, dropout
        self.moe_pattern, self.n_experts, self.n_shared_experts = moe_pattern, n_experts, n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok  # hybridlm's model.top_k, under Mixtral's name: `top_k` is a
        # generation setting to transformers, which refuses it in a model config
        self.capacity_factor, self.eval_capacity_factor, self.moe_balance = capacity_factor, eval_capacity_factor, moe_balance
        self.tie_word_embeddings, self.initializer_range = tie_word_embeddings, initializer_range
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        if len(layer_pattern) != n_layer or set(layer_pattern) - {"D", "S"}:
            raise ValueError(f"layer_pattern {layer_pattern!r} must hold n_layer ({n_layer}) letters D or S")
