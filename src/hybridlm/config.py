"""Model configuration: one validated dataclass and the named presets built from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hybridlm.errors import UserError

POSITIONS = ("rope", "learned", "sinusoidal")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("gelu", "swiglu", "moe")
MOE_BALANCE = ("aux", "bias")
HEADS = ("lm", "reward")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape and attention layout of a hybrid-attention transformer.

    Layer kinds come from `layer_pattern` ("D" = dense causal, "S" = sparse), or,
    when it is empty, from `n_dense_layers` dense layers at the bottom and sparse above.
    """

    vocab_size: int = 4096
    """Token vocabulary size (set from the tokenizer when training)."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Query heads per attention layer."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention); 0 means n_head."""
    d_model: int = 384
    """Residual stream width."""
    d_ff: int = 0
    """FFN hidden width; 0 means 4*d_model (GELU) or the 8/3 rule rounded to 64 (SwiGLU)."""
    max_seq_len: int = 1024
    """Context length in tokens."""
    layer_pattern: str = ""
    """Per-layer kinds, e.g. "DDSSSS"; empty means derive from n_dense_layers."""
    n_dense_layers: int = -1
    """Dense layers at the bottom when layer_pattern is empty; -1 means n_layer // 3."""
    window: int = 128
    """Sparse layers: local window w (a query sees itself and the w-1 tokens before it)."""
    stride: int = 128
    """Sparse layers: every position p with (p+1) % stride == 0 stays visible as a summary."""
    n_global: int = 8
    """Sparse layers: learned global key/value slots per layer, always visible."""
    position: str = "rope"
    """Positional encoding: rope, learned or sinusoidal."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "rmsnorm"
    """Pre-norm type: layernorm or rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norm layers."""
    ffn: str = "swiglu"
    """Feed-forward type: gelu, swiglu, or moe (a mixture of SwiGLU experts of width d_ff each)."""
    moe_pattern: str = ""
    """With ffn = "moe": per-layer FFN kinds, "M" = mixture of experts, "F" = one SwiGLU FFN, e.g.
    "FMFM"; empty means every layer is a mixture."""
    n_experts: int = 8
    """With ffn = "moe": routed experts per MoE layer."""
    top_k: int = 1
    """With ffn = "moe": experts per token (1 = Switch Transformer, 2 = Mixtral)."""
    capacity_factor: float = 1.25
    """With ffn = "moe", in training: an expert takes at most ceil(factor * T * top_k / n_experts) of
    a sequence's T tokens; the rest of its tokens skip it (they keep the residual)."""
    eval_capacity_factor: float = 2.0
    """The same limit in evaluation and generation."""
    moe_aux_loss: float = 1e-2
    """With ffn = "moe": weight alpha of the load-balancing loss alpha * N * sum_i f_i * P_i."""
    moe_z_loss: float = 1e-3
    """With ffn = "moe": weight of the router z-loss, mean(logsumexp(router logits)^2)."""
    n_shared_experts: int = 0
    """With ffn = "moe": experts every token goes through besides its routed ones."""
    moe_balance: str = "aux"
    """With ffn = "moe": aux (the loss above alone), or bias: also a per-expert bias on the routing
    scores, moved after each step towards even load (aux-loss-free balancing, DeepSeek-V3)."""
    moe_bias_rate: float = 1e-3
    """With moe_balance = "bias": how far each step moves an expert's bias."""
    bias: bool = False
    """Bias terms in linear layers."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    dropout: float = 0.0
    """Dropout on attention output and FFN output during training."""
    head: str = "lm"
    """lm (next-token logits), or lm plus reward: one scalar per sequence, read at its last token
    (reward models; the `rm` objective sets it)."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "window", "stride")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be > 0 (got {getattr(self, name)})")
        if self.n_global < 0:
            raise UserError(f"model.n_global must be >= 0 (got {self.n_global})")
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 0 or self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2 and self.position == "rope":
            raise UserError(f"RoPE needs an even head dim; d_model/n_head = {self.head_dim}")
        _check_choice("position", self.position, POSITIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("ffn", self.ffn, FFNS)
        self._check_moe()
        _check_choice("head", self.head, HEADS)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.ffn == "gelu" else 64 * -(-(8 * self.d_model // 3) // 64)
        self.layer_pattern = self._resolve_pattern()

    def _check_moe(self) -> None:
        fields = ("moe_pattern", "n_experts", "top_k", "capacity_factor", "eval_capacity_factor", "moe_aux_loss",
                  "moe_z_loss", "n_shared_experts", "moe_balance", "moe_bias_rate")
        if self.ffn != "moe":
            for name in fields:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise UserError(f"model.{name} applies to mixture-of-experts layers; set model.ffn = \"moe\" "
                                    f"or leave it unset (model.ffn is {self.ffn!r})")
            return
        if self.n_experts < 2:
            raise UserError(f"model.n_experts must be >= 2 (got {self.n_experts})")
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"model.top_k must be in 1..model.n_experts ({self.n_experts}) (got {self.top_k})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be > 0 (got {getattr(self, name)}); 1.0 gives every expert "
                                "its even share of the tokens")
        for name in ("moe_aux_loss", "moe_z_loss", "n_shared_experts", "moe_bias_rate"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} must be >= 0 (got {getattr(self, name)})")
        _check_choice("moe_balance", self.moe_balance, MOE_BALANCE)
        self.moe_pattern = self.moe_pattern.upper() or "M" * self.n_layer
        if set(self.moe_pattern) - {"M", "F"} or len(self.moe_pattern) != self.n_layer:
            raise UserError(f"model.moe_pattern must have one letter M or F per layer ({self.n_layer}); "
                            f"got {self.moe_pattern!r}")

    def _resolve_pattern(self) -> str:
        if self.layer_pattern:
            pattern = self.layer_pattern.upper()
            if set(pattern) - {"D", "S"}:
                raise UserError(f"model.layer_pattern may hold only D and S (got {self.layer_pattern!r})")
            if len(pattern) != self.n_layer:
                raise UserError(
                    f"model.layer_pattern has {len(pattern)} letters but model.n_layer is {self.n_layer}; "
                    "give one letter per layer"
                )
            return pattern
        n_dense = self.n_layer // 3 if self.n_dense_layers < 0 else self.n_dense_layers
        if n_dense > self.n_layer:
            raise UserError(
                f"model.n_dense_layers ({n_dense}) is larger than model.n_layer ({self.n_layer}); "
                f"use a value from 0 to {self.n_layer}"
            )
        return "D" * n_dense + "S" * (self.n_layer - n_dense)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def all_dense(self) -> "ModelConfig":
        """The same model with every layer dense: the comparison point for sparsity."""
        return dataclasses.replace(self, layer_pattern="D" * self.n_layer)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"model.{name} must be one of {', '.join(choices)} (got {value!r})")


_PRESET_FIELDS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=2048, n_layer=4, n_head=4, d_model=128, max_seq_len=256,
        layer_pattern="DSSS", window=32, stride=32, n_global=4,
    ),
    "small": dict(
        vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=1024,
        layer_pattern="DDSSSS", window=128, stride=128, n_global=8,
    ),
    "gpt2-124m": dict(
        vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
        n_dense_layers=12, position="learned", norm="layernorm", ffn="gelu", bias=True,
    ),
    "paper-7b": dict(
        vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008, max_seq_len=4096,
        n_dense_layers=8, window=64, stride=64, n_global=16, tie_embeddings=False,
    ),
    "paper-30b": dict(
        vocab_size=32000, n_layer=60, n_head=52, d_model=6656, d_ff=17920, max_seq_len=8192,
        n_dense_layers=15, window=91, stride=91, n_global=16, tie_embeddings=False,
    ),
}
PRESETS: tuple[str, ...] = tuple(_PRESET_FIELDS)


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's config with some fields replaced; overrides apply before validation."""
    if name not in _PRESET_FIELDS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    fields = {**_PRESET_FIELDS[name], **overrides}
    if {"n_layer", "n_dense_layers"} & overrides.keys() and "layer_pattern" not in overrides:
        fields["layer_pattern"] = ""  # the preset's pattern no longer fits: derive it again
    return ModelConfig(**fields)
