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
    x_B1C = model.embed(torch.tensor(tokens, device=device)[:, None], torch.tensor(starts, device=device)[:, None])
    for layer, block in enumerate(model.blocks):
        layer_caches = [cache[layer] for cache in caches]
        x_B1C = x_B1C + _attention(block.attn, block.norm1(x_B1C), starts, layer_caches)
        x_B1C = x_B1C + block.ffn(block.norm2(x_B1C))
    return model.lm_head(model.norm_f(x_B1C))[:, 0]


def _attention(attn: Attention, x_B1C: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
    """Batched qkv and output projections around per-row RoPE + cached attention."""
    q_BH1D, k_BK1D, v_BK1D = attn.heads(x_B1C)
    rows = []
    for b, (start, cache) in enumerate(zip(starts, caches)):
        q_1H1D, k_1K1D = q_BH1D[b : b + 1], k_BK1D[b : b + 1]
        if attn.rotary is not None:
            q_1H1D, k_1K1D = attn.rotary(q_1H1D, start), attn.rotary(k_1K1D, start)
        # The model's own dispatch (dense cache, or sparse cache + global slots), so a row takes
        # exactly the path `model(ids, cache)` takes for a single sequence.
        rows.append(attn.attend(q_1H1D, k_1K1D, v_BK1D[b : b + 1], cache, True))
    return attn.merge(torch.cat(rows))
