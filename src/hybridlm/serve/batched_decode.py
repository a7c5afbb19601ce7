"""One decode step for B sequences that sit at different positions, each with its own caches.

`HybridLM.forward` takes one start position for the whole batch, so sequences that joined the
batch at different times cannot share a call. This walks the model's own modules instead: the
embedding, norms, qkv and output projections, FFN and LM head run once on the (B, 1, C) batch
(the heavy, weight-bound work), while RoPE and attention run per sequence, at that sequence's
position, against that sequence's per-layer caches (dense: the full history; sparse: window +
strided + global entries). Per row this is the very code path of `model(ids, cache)`, so a
sequence decodes the same tokens alone or in a batch (tests check it against
inference/engine.py's greedy decode).
"""

from __future__ import annotations

import torch

from hybridlm.model import HybridLM
from hybridlm.model.transformer import Attention, LayerCache


def decode_step(model: HybridLM, tokens: list[int], caches: list[list[LayerCache]]) -> torch.Tensor:
    """Logits (B, vocab) after feeding token b to sequence b; every cache grows by one entry.
    `caches[b]` is sequence b's per-layer cache list (from `model.new_cache()`, already filled)."""
    if len(tokens) != len(caches) or not tokens:
        raise ValueError(f"need one cache list per token (got {len(tokens)} tokens, {len(caches)} caches)")
    starts = [cache[0].length for cache in caches]
    if max(starts) >= model.cfg.max_seq_len:
        raise ValueError(f"a sequence is already at the context length of {model.cfg.max_seq_len}")
    device = model.tok_emb.weight.device
    x_B1C = model.tok_emb(torch.tensor(tokens, device=device)[:, None])
    x_B1C = model.drop(_add_positions(model, x_B1C, starts))
    for layer, block in enumerate(model.blocks):
        layer_caches = [cache[layer] for cache in caches]
        x_B1C = x_B1C + _attention(block.attn, block.norm1(x_B1C), starts, layer_caches)
        x_B1C = x_B1C + block.ffn(block.norm2(x_B1C))
    return model.lm_head(model.norm_f(x_B1C))[:, 0]


def _add_positions(model: HybridLM, x_B1C: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Absolute position encodings (learned or sinusoidal) at each row's own position; RoPE
    models add nothing here (the rotation happens per row in attention)."""
    if model.pos_emb is not None:
        positions = torch.tensor(starts, device=x_B1C.device)
        return x_B1C + model.pos_emb(positions)[:, None]
    if model.cfg.position == "sinusoidal":
        return x_B1C + model.pos_table[starts][:, None]
    return x_B1C


def _attention(attn: Attention, x_B1C: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
    """Batched qkv and output projections around per-row RoPE + cached attention."""
    B = x_B1C.shape[0]
    H, KV, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x_B1C).split([H * D, KV * D, KV * D], dim=-1)
    q_BH1D = q.view(B, 1, H, D).transpose(1, 2)
    k_BK1D = k.view(B, 1, KV, D).transpose(1, 2)
    v_BK1D = v.view(B, 1, KV, D).transpose(1, 2)
    rows = []
    for b, (start, cache) in enumerate(zip(starts, caches)):
        q_1H1D, k_1K1D = q_BH1D[b : b + 1], k_BK1D[b : b + 1]
        if attn.rotary is not None:
            q_1H1D, k_1K1D = attn.rotary(q_1H1D, start), attn.rotary(k_1K1D, start)
        # The model's own dispatch (dense cache, or sparse cache + global slots), so a row takes
        # exactly the path `model(ids, cache)` takes for a single sequence.
        rows.append(attn._attend(q_1H1D, k_1K1D, v_BK1D[b : b + 1], cache, True))
    y_B1HD = torch.cat(rows).transpose(1, 2).reshape(B, 1, H * D)
    return attn.dropout(attn.proj(y_B1HD))
