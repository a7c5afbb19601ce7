"""The hybrid-attention transformer: embeddings, pre-norm blocks, LM head.

Each block's attention kind comes from its LayerSpec (see layout.py); the forward pass is the
same for dense and sparse layers except for the attention call. The same modules serve as an
encoder for masked language modelling: forward(..., causal=False) lets every layer look both ways.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.attention import (
    blockwise_sparse_attention,
    dense_bidirectional_attention,
    dense_causal_attention,
    sparse_causal_attention,
)
from hybridlm.model.decode_kernel_bf16 import linear_applies, linear_bf16, widens_bf16
from hybridlm.model.decode_step import fused_logits
from hybridlm.model.glue_kernels_bf16 import (
    GELUTanh,
    NormToBF16,
    SwiGLU,
    activation_kernel_applies,
    norm_kernel_applies,
)
from hybridlm.model.kv_cache import DenseKVCache, ModelCache, SparseKVCache
from hybridlm.model.layout import LayerSpec, resolve_layers
from hybridlm.model.loss import chunked_cross_entropy, target_log_probs
from hybridlm.model.moe import MoEFeedForward
from hybridlm.model.positions import Rotary, sinusoidal_table
from hybridlm.tensors import local_tensor

LayerCache = DenseKVCache | SparseKVCache


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    if activation_kernel_applies(y):
        return SwiGLU.apply(y)
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    if activation_kernel_applies(y):
        return GELUTanh.apply(y)
    return F.gelu(y, approximate="tanh")


ACTIVATIONS = {"none": lambda y: y, "gelu_tanh": _gelu_tanh, "swiglu": _swiglu}
"""What may follow a Linear layer (the decode kernel fuses each into the layer's output)."""


class Linear(nn.Linear):
    """nn.Linear whose few-row bf16 inference calls (a decode step) take the decode kernel, which
    reads cached weights at several times the speed of oneDNN's GEMM there and can apply the
    following activation before rounding (decode_kernel_bf16.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if linear_applies(x, self.weight):
            return linear_bf16(x, self.weight, self.bias)
        if widens_bf16(x, self.weight):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return F.linear(x, self.weight, self.bias)

    def fused(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """ACTIVATIONS[activation] of this layer's output in one kernel call, or None where the
        kernel does not apply or hooks wait on this layer's own call (tensor parallelism's input and
        output layouts, analysis probes): the caller then calls the layer and the activation."""
        if self._forward_hooks or self._forward_pre_hooks or not linear_applies(x, self.weight):
            return None
        return linear_bf16(x, self.weight, self.bias, activation)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose fp32 rows under bf16 CPU autocast (a training step) take one fused C++
    pass each way, written in bf16 for the next matmul (glue_kernels_bf16.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eps is not None and norm_kernel_applies(x, self.weight):
            return NormToBF16.apply(x, self.weight, None, self.eps, False)
        return super().forward(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's fused bf16-autocast passes (glue_kernels_bf16.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if norm_kernel_applies(x, self.weight, self.bias):
            return NormToBF16.apply(x, self.weight, self.bias, self.eps, True)
        return super().forward(x)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention of one kind: dense or sparse."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, rotary: Rotary | None) -> None:
        super().__init__()
        self.spec, self.rotary = spec, rotary
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        if spec.sparse and spec.n_global:
            self.k_global = nn.Parameter(torch.zeros(cfg.n_kv_head, spec.n_global, cfg.head_dim))
            self.v_global = nn.Parameter(torch.zeros(cfg.n_kv_head, spec.n_global, cfg.head_dim))
        else:
            self.k_global = self.v_global = None

    def forward(self, x_BTC: torch.Tensor, start: int, cache: LayerCache | None, causal: bool) -> torch.Tensor:
        q_BHTD, k_BHTD, v_BHTD = self.heads(x_BTC, start)
        return self.merge(self.attend(q_BHTD, k_BHTD, v_BHTD, cache, causal))

    def heads(self, x_BTC: torch.Tensor, positions: int | list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, n_head, T, D), k and v (B, n_kv_head, T, D): one projection for all three. With
        `positions` (see Rotary.rotate_heads) q and k come rotated, in one call for both."""
        B, T, _ = x_BTC.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        qkv_BTND = self.qkv(x_BTC).view(B, T, H + 2 * KV, D)
        qk_BTND, v_BTKD = qkv_BTND[:, :, : H + KV], qkv_BTND[:, :, H + KV :]
        if positions is not None and self.rotary is not None:
            qk_BTND = self.rotary.rotate_heads(qk_BTND, positions)
        return qk_BTND[:, :, :H].transpose(1, 2), qk_BTND[:, :, H:].transpose(1, 2), v_BTKD.transpose(1, 2)

    def merge(self, y_BHTD: torch.Tensor) -> torch.Tensor:
        """The heads' outputs back to (B, T, C) through the output projection."""
        B, _, T, _ = y_BHTD.shape
        return self.dropout(self.proj(y_BHTD.transpose(1, 2).reshape(B, T, -1)))

    def attend(self, q, k, v, cache: LayerCache | None, causal: bool) -> torch.Tensor:
        """Attention of this layer's kind (dense, or sparse with the global slots), through the
        cache when decoding; q and k already rotated."""
        if not self.spec.sparse:
            if cache is not None:
                return cache.attend(q, k, v)
            return dense_causal_attention(q, k, v) if causal else dense_bidirectional_attention(q, k, v)
        kg = vg = None
        if self.k_global is not None:
            batch = q.shape[0]
            kg = local_tensor(self.k_global).to(k.dtype).expand(batch, -1, -1, -1)  # this rank's heads under TP
            vg = local_tensor(self.v_global).to(v.dtype).expand(batch, -1, -1, -1)
        if cache is not None:
            return cache.attend(q, k, v, kg, vg)
        # The fused sparse paths are causal-only: bidirectional calls take the block loop.
        sparse_attention = sparse_causal_attention if causal else partial(blockwise_sparse_attention, causal=False)
        return sparse_attention(
            q, k, v, window=self.spec.window, stride=self.spec.stride, k_extra_BHED=kg, v_extra_BHED=vg
        )

    def decode_rows(self, x_B1C: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
        """One new token per row, row b at position starts[b] with its own cache: the projections
        and RoPE run once for the batch, attention per row (the path `forward` takes for one
        sequence with a cache, so a row decodes alike alone or batched)."""
        q_BH1D, k_BK1D, v_BK1D = self.heads(x_B1C, starts)
        rows = [self.attend(q_BH1D[b : b + 1], k_BK1D[b : b + 1], v_BK1D[b : b + 1], cache, True)
                for b, cache in enumerate(caches)]
        return self.merge(torch.cat(rows))


class FeedForward(nn.Module):
    """GELU MLP or SwiGLU (also each expert of a mixture)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.ffn in ("swiglu", "moe")
        self.up = Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        activation = "swiglu" if self.gated else "gelu_tanh"
        hidden = self.up.fused(x_BTC, activation) if isinstance(self.up, Linear) else None  # not a converter's
        if hidden is None:
            hidden = ACTIVATIONS[activation](self.up(x_BTC))
        return self.dropout(self.down(hidden))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, rotary: Rotary | None) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg, spec, rotary)
        self.norm2 = _norm(cfg)
        self.ffn = MoEFeedForward(cfg, partial(FeedForward, cfg)) if spec.moe else FeedForward(cfg)

    def forward(self, x_BTC: torch.Tensor, start: int, cache: LayerCache | None, causal: bool) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.norm1(x_BTC), start, cache, causal)
        return x_BTC + self.feed_forward(self.norm2(x_BTC), cached=cache is not None)

    def decode_rows(self, x_B1C: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
        x_B1C = x_B1C + self.attn.decode_rows(self.norm1(x_B1C), starts, caches)
        return x_B1C + self.feed_forward(self.norm2(x_B1C), cached=True)

    def feed_forward(self, x_BTC: torch.Tensor, cached: bool) -> torch.Tensor:
        """The FFN; a mixture applies its capacity limit only without a KV cache (see moe.py)."""
        return self.ffn(x_BTC, limited=not cached) if isinstance(self.ffn, MoEFeedForward) else self.ffn(x_BTC)


class HybridLM(nn.Module):
    """Decoder-only language model with per-layer dense or sparse attention (an encoder with causal=False)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs = resolve_layers(cfg)
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, spec, rotary) for spec in self.specs)
        self.norm_f = _norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reward_head = Linear(cfg.d_model, 1, bias=False) if cfg.head == "reward" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "down.weight")):  # experts' too
                nn.init.normal_(p, std=residual_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def fill_position_tables(self) -> None:
        """Recompute the non-persistent position tables (RoPE, sinusoidal), which a model built on
        the meta device and given storage with to_empty() holds uninitialised."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.fill_tables()
        if self.cfg.position == "sinusoidal":
            self.pos_table = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model).to(self.pos_table.device)

    def new_cache(self) -> ModelCache:
        """Empty per-layer caches for incremental decoding (one per sequence, or per batch decoded together)."""
        return ModelCache([
            SparseKVCache(spec.window, spec.stride) if spec.sparse else DenseKVCache(self.cfg.max_seq_len)
            for spec in self.specs
        ])

    def embed(self, ids_BT: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus absolute position encodings (learned or sinusoidal) at `positions`,
        (T,) shared by the batch or (B, T) per row; RoPE models add nothing here (attention rotates)."""
        x_BTC = self.tok_emb(ids_BT)
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb(positions)
        elif self.cfg.position == "sinusoidal":
            x_BTC = x_BTC + self.pos_table[positions]
        return self.drop(x_BTC)

    def forward(
        self,
        ids_BT: torch.Tensor,
        cache: list[LayerCache] | None = None,
        targets_BT: torch.Tensor | None = None,
        *,
        causal: bool = True,
        per_token: bool = False,
        reward_at_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with `targets_BT`, the mean cross-entropy instead (targets equal to
        IGNORE_INDEX add nothing), computed without materialising the logits, or with per_token the
        log-probability of each target (B, T), 0 where ignored (DPO and RL sum them per reply). With
        `reward_at_B`, the reward head's scalar (B,) at position reward_at_B[b] of row b. With a
        cache, ids continue the sequence the cache has seen. causal=False lets every position see
        later ones too (masked language modelling); the sparse layers' pattern is then symmetric.
        Every output goes through forward, so DDP and FSDP see each use of the weights. A bf16
        decode step (one token, a cache from new_cache) takes the fused step where it applies
        (decode_step.py), with the same numbers as the modules give."""
        if cache is not None and ids_BT.shape[1] == 1 and targets_BT is None and reward_at_B is None and causal:
            start = cache[0].length
            self._check_length(start + 1)
            logits_BV = fused_logits(self, ids_BT, [start] * ids_BT.shape[0], [cache])
            if logits_BV is not None:
                return logits_BV[:, None]
        x_BTC = self.hidden_states(ids_BT, cache, causal)
        if reward_at_B is not None:
            if self.reward_head is None:
                raise ValueError("this model has no reward head (model.head = \"lm\")")
            picked_BC = x_BTC[torch.arange(x_BTC.shape[0], device=x_BTC.device), reward_at_B]
            return self.reward_head(picked_BC)[:, 0].float()
        if targets_BT is not None and per_token:
            return target_log_probs(self.lm_head(x_BTC), targets_BT)
        if targets_BT is not None:
            return chunked_cross_entropy(x_BTC.flatten(0, 1), self.lm_head.weight, targets_BT.flatten())
        return self.lm_head(x_BTC)

    def hidden_states(self, ids_BT: torch.Tensor, cache: list[LayerCache] | None, causal: bool) -> torch.Tensor:
        """The final-norm hidden states (B, T, C) that every head reads."""
        if cache is not None and not causal:
            raise ValueError("causal=False cannot use a KV cache: cached decoding is causal")
        start = 0 if cache is None else cache[0].length
        T = ids_BT.shape[1]
        self._check_length(start + T)
        x_BTC = self.embed(ids_BT, torch.arange(start, start + T, device=ids_BT.device))
        for i, block in enumerate(self.blocks):
            x_BTC = block(x_BTC, start, None if cache is None else cache[i], causal)
        return self.norm_f(x_BTC)

    def _check_length(self, length: int) -> None:
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds the context of {self.cfg.max_seq_len}")

    def decode_rows(self, tokens: list[int], caches: list[ModelCache]) -> torch.Tensor:
        """Logits (B, vocab) after feeding token b to sequence b, for B sequences that sit at
        different positions (they joined a decode batch at different times, so one `forward` with a
        shared start cannot serve them). `caches[b]` is sequence b's filled per-layer cache list
        (from `new_cache()`); each grows by one entry. Embedding, norms, projections, FFN and head
        run once on the (B, 1, C) batch, the weight-bound work; RoPE and attention per row (in the
        fused step where it applies, decode_step.py)."""
        if len(tokens) != len(caches) or not tokens:
            raise ValueError(f"need one cache list per token (got {len(tokens)} tokens, {len(caches)} caches)")
        starts = [cache[0].length for cache in caches]
        if max(starts) >= self.cfg.max_seq_len:
            raise ValueError(f"a sequence is already at the context length of {self.cfg.max_seq_len}")
        device = self.tok_emb.weight.device
        logits_BV = fused_logits(self, torch.tensor(tokens, device=device)[:, None], starts, caches)
        if logits_BV is not None:
            return logits_BV
        x_B1C = self.embed(torch.tensor(tokens, device=device)[:, None], torch.tensor(starts, device=device)[:, None])
        for layer, block in enumerate(self.blocks):
            x_B1C = block.decode_rows(x_B1C, starts, [cache[layer] for cache in caches])
        return self.lm_head(self.norm_f(x_B1C))[:, 0]
