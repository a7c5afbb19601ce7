"""hybridlm's hybrid-attention transformer for Hugging Face transformers (remote code).

Copied into the directory that `hybridlm export hf --format remote` writes; it imports only torch
and transformers, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works
where hybridlm is not installed. Parameter names are hybridlm's own, so the weights are the run's.

Written for exactness rather than speed: every layer kind gets an explicit boolean mask (queries x
keys) for SDPA, so memory grows like T^2. `generate()` keeps every layer's keys and values in
transformers' DynamicCache (rotated, before the global slots), so each new token costs one query
against the cache, as with any transformers model; sparse layers keep the whole history and mask
it. A sparse layer's query at position i sees the key at position j when j <= i and
(j > i - window or (j + 1) % stride == 0), plus the layer's learned global key/value slots, always
visible. Positions count the real tokens of a row (attention_mask), so a left-padded row gives the
same logits as the same tokens unpadded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hybridlm import HybridLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(cfg: HybridLMConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, pos_BT: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, head_dim / 2) of the rotate-half rotary embedding at positions pos_BT."""
    device = pos_BT.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles_TF = torch.outer(torch.arange(int(pos_BT.max()) + 1, dtype=torch.float32, device=device), inv_freq)
    return angles_TF.cos()[pos_BT][:, None], angles_TF.sin()[pos_BT][:, None]


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHTD.dtype)


def sinusoidal_table(n: int, dim: int, device: torch.device) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need", shape (n, dim)."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def visible_keys(pos_BS: torch.Tensor, real_BS: torch.Tensor, T: int, sparse: bool, window: int,
                 stride: int) -> torch.Tensor:
    """(B, 1, T, S) boolean: query t (the last T of the S tokens so far) sees key s. Keys must be
    real tokens at or before the query; sparse layers keep the local window and the strided summary
    columns of the positions. A query always sees itself, so a padding row is never empty."""
    S = pos_BS.shape[1]
    key = torch.arange(S, device=pos_BS.device)
    query = key[S - T :]
    i, j = pos_BS[:, S - T :, None], pos_BS[:, None, :]
    visible = (key[None, None, :] <= query[None, :, None]) & real_BS[:, None, :]
    if sparse:
        visible = visible & ((j > i - window) | ((j + 1) % stride == 0))
    return (visible | (key[None, None, :] == query[None, :, None]))[:, None]


class HybridLMAttention(nn.Module):
    """Grouped-query attention of one kind; sparse layers own n_global learned key/value slots."""

    def __init__(self, cfg: HybridLMConfig, sparse: bool, layer_idx: int) -> None:
        super().__init__()
        self.sparse, self.layer_idx = sparse, layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        if sparse and cfg.n_global:
            self.k_global = nn.Parameter(torch.zeros(cfg.n_kv_head, cfg.n_global, self.head_dim))
            self.v_global = nn.Parameter(torch.zeros(cfg.n_kv_head, cfg.n_global, self.head_dim))
        else:
            self.k_global = self.v_global = None

    def forward(self, x_BTC: torch.Tensor, mask_B1TS: torch.Tensor, rope: tuple | None,
                cache: DynamicCache | None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x_BTC).split([self.n_head * self.head_dim, kv_width, kv_width], dim=-1)
        q_BHTD = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k_BHTD = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v_BHTD = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q_BHTD, k_BHTD = apply_rope(q_BHTD, *rope), apply_rope(k_BHTD, *rope)
        if cache is not None:  # the keys and values of every token so far
            k_BHTD, v_BHTD = cache.update(k_BHTD, v_BHTD, self.layer_idx)
        if self.k_global is not None:  # the global slots come first; the mask's first columns are theirs
            k_BHTD = torch.cat([self.k_global.to(k_BHTD.dtype).expand(B, -1, -1, -1), k_BHTD], dim=2)
            v_BHTD = torch.cat([self.v_global.to(v_BHTD.dtype).expand(B, -1, -1, -1), v_BHTD], dim=2)
        group = self.n_head // self.n_kv_head
        if group > 1:
            k_BHTD, v_BHTD = k_BHTD.repeat_interleave(group, dim=1), v_BHTD.repeat_interleave(group, dim=1)
        y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask_B1TS)
        return self.dropout(self.proj(y_BHTD.transpose(1, 2).reshape(B, T, -1)))


class HybridLMFeedForward(nn.Module):
    """GELU (tanh approximation) MLP or SwiGLU (also each expert of a mixture)."""

    def __init__(self, cfg: HybridLMConfig) -> None:
        super().__init__()
        self.gated = cfg.ffn in ("swiglu", "moe")
        self.up = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x_BTC).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(self.up(x_BTC), approximate="tanh")
        return self.dropout(self.down(hidden))


class HybridLMMixture(nn.Module):
    """Mixture of SwiGLU experts. Every expert runs on every token and the outputs are weighted,
    so this is E times the work of hybridlm's dispatch but follows the definition plainly: fp32
    softmax router, top_k chosen on probabilities (+ the balancing bias, if any), gates renormalised
    when top_k > 1, and per row an expert takes at most ceil(factor * tokens * top_k / n_experts)
    tokens, earliest first (padding counts for nothing); the others skip it. As in hybridlm, the
    limit applies to forwards without a cache only, so generation never drops a token."""

    def __init__(self, cfg: HybridLMConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.num_experts_per_tok
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(HybridLMFeedForward(cfg) for _ in range(cfg.n_experts))
        self.shared = nn.ModuleList(HybridLMFeedForward(cfg) for _ in range(cfg.n_shared_experts))
        if cfg.moe_balance == "bias":
            self.register_buffer("balance_bias", torch.zeros(cfg.n_experts))
        else:
            self.balance_bias = None

    def forward(self, x_BTC: torch.Tensor, real_BT: torch.Tensor, limited: bool) -> torch.Tensor:
        probs = F.linear(x_BTC.float(), self.router.weight.float()).softmax(dim=-1)
        scores = probs if self.balance_bias is None else probs + self.balance_bias
        chosen_BTK = scores.topk(self.top_k, dim=-1).indices
        gates_BTK = probs.gather(-1, chosen_BTK)
        if self.top_k > 1:
            gates_BTK = gates_BTK / gates_BTK.sum(dim=-1, keepdim=True)
        B, T, K = chosen_BTK.shape
        one_hot = F.one_hot(chosen_BTK, self.n_experts) * real_BT[:, :, None, None]  # (B, T, K, E)
        rank = (one_hot.reshape(B, T * K, -1).cumsum(dim=1).reshape(B, T, K, -1) * one_hot).sum(-1) - 1
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = (factor * real_BT.sum(dim=1) * K / self.n_experts).ceil().clamp(min=1)
        kept_BTK = rank < capacity[:, None, None] if limited else torch.ones_like(rank, dtype=torch.bool)
        weight_BTE = (one_hot * (gates_BTK * kept_BTK)[..., None]).sum(dim=2)
        y_BTC = sum(weight_BTE[..., e, None] * expert(x_BTC).float() for e, expert in enumerate(self.experts))
        y_BTC = y_BTC.to(x_BTC.dtype)
        for expert in self.shared:
            y_BTC = y_BTC + expert(x_BTC)
        return y_BTC


class HybridLMBlock(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, cfg: HybridLMConfig, sparse: bool, layer_idx: int) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(cfg), HybridLMAttention(cfg, sparse, layer_idx)
        self.mixture = cfg.ffn == "moe" and cfg.moe_pattern[layer_idx] == "M"
        self.norm2 = _norm(cfg)
        self.ffn = HybridLMMixture(cfg) if self.mixture else HybridLMFeedForward(cfg)

    def forward(self, x_BTC: torch.Tensor, mask_B1TS: torch.Tensor, rope: tuple | None,
                cache: DynamicCache | None, real_BT: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.norm1(x_BTC), mask_B1TS, rope, cache)
        hidden = self.norm2(x_BTC)
        return x_BTC + (self.ffn(hidden, real_BT, limited=cache is None) if self.mixture else self.ffn(hidden))


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Decoder-only language model with per-layer dense or sparse attention."""

    config_class = HybridLMConfig
    base_model_prefix = ""
    _no_split_modules = ["HybridLMBlock"]  # noqa: RUF012 - as transformers declares it
    _tied_weights_keys = {"lm_head.weight": "tok_emb.weight"}  # noqa: RUF012

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(HybridLMBlock(config, kind == "S", i) for i, kind in enumerate(config.layer_pattern))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh models only (from_config): loaded weights replace all of this."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, HybridLMAttention) and module.k_global is not None:
            nn.init.zeros_(module.k_global)
            nn.init.zeros_(module.v_global)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _masks(self, pos_BS: torch.Tensor, real_BS: torch.Tensor, T: int) -> dict:
        """One (B, 1, T, n_global + S) mask per layer kind for the last T of S tokens; the global
        slots' columns come first."""
        cfg, masks = self.config, {}
        B = pos_BS.shape[0]
        for kind in set(cfg.layer_pattern):
            sparse = kind == "S"
            visible = visible_keys(pos_BS, real_BS, T, sparse, cfg.window, cfg.stride)
            if sparse and cfg.n_global:
                always = torch.ones(B, 1, T, cfg.n_global, dtype=torch.bool, device=pos_BS.device)
                visible = torch.cat([always, visible], dim=-1)
            masks[kind] = visible
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (and the mean next-token loss with `labels`, shifted here as
        transformers does). With a cache (`cache`, the name transformers 5.24 and later pass, or
        `past_key_values`, the earlier one; or use_cache=True, which starts one) the ids continue
        the tokens the cache holds, and `attention_mask` covers all of them. Any other argument is
        refused by name rather than ignored."""
        past_key_values = _one_cache(past_key_values, cache)
        _check_extra_arguments(kwargs, past_key_values, input_ids if inputs_embeds is None else inputs_embeds)
        cfg = self.config
        x_BTC = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x_BTC.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=cfg)
        S = T + (past_key_values.get_seq_length() if past_key_values is not None else 0)
        if S > cfg.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds the context of {cfg.max_seq_len}")
        if attention_mask is None:
            real_BS = torch.ones(B, S, dtype=torch.bool, device=x_BTC.device)
        elif attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but there are {S} "
                             f"({S - T} cached + {T} new); give the mask of every token so far")
        else:
            real_BS = attention_mask.to(x_BTC.device).bool()
        pos_BS = (real_BS.long().cumsum(-1) - 1).clamp(min=0)  # padding before a row's text takes no position
        pos_BT = pos_BS[:, S - T :]
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb(pos_BT)
        elif cfg.position == "sinusoidal":
            x_BTC = x_BTC + sinusoidal_table(int(pos_BT.max()) + 1, cfg.d_model, x_BTC.device)[pos_BT].to(x_BTC.dtype)
        rope = rope_tables(cfg.d_model // cfg.n_head, pos_BT, cfg.rope_theta) if cfg.position == "rope" else None
        masks = self._masks(pos_BS, real_BS, T)
        x_BTC = self.drop(x_BTC)
        for kind, block in zip(cfg.layer_pattern, self.blocks):
            x_BTC = block(x_BTC, masks[kind], rope, past_key_values, real_BS[:, S - T :])
        logits = self.lm_head(self.norm_f(x_BTC))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        if return_dict is False:
            return tuple(v for v in (loss, logits, past_key_values) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: past_key_values})


_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The output field that carries the cache back to generate(): `cache` from transformers 5.24 on."""


def _one_cache(past_key_values: DynamicCache | None, cache: DynamicCache | None) -> DynamicCache | None:
    """The cache under whichever name the caller used; two different ones are an error."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("both `cache` and `past_key_values` were given; pass the cache once, as `cache`")
    return cache if cache is not None else past_key_values


def _check_extra_arguments(kwargs: dict, cache: DynamicCache | None, inputs: torch.Tensor) -> None:
    """Arguments transformers may pass that this model has no parameter for: `cache_position`
    (generate() in 4.x) must say what the cache already implies, attention and hidden-state outputs
    are not implemented, and anything else is unknown. None of them is dropped silently."""
    kwargs = dict(kwargs)
    cache_position = kwargs.pop("cache_position", None)
    if cache_position is not None:
        past = cache.get_seq_length() if cache is not None else 0
        expected = torch.arange(past, past + inputs.shape[1], device=cache_position.device)
        if not torch.equal(cache_position.reshape(-1), expected):
            raise ValueError(f"cache_position {cache_position.tolist()} does not continue the {past} cached tokens; "
                             "positions follow the cache and attention_mask")
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ValueError(f"{name}=True is not implemented by the hybridlm export")
    if kwargs:
        raise TypeError(f"HybridLMForCausalLM.forward() got unsupported argument(s) {sorted(kwargs)}; "
                        "a cache goes in as `cache` (or `past_key_values`)")
