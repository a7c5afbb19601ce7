"""Token-id generation with per-layer KV caches: prefill once, then one token per step.

The model runs in its own parameter dtype (load it in bf16 for fast CPU decoding): autocast
would cast every weight again at every step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from hybridlm.errors import UserError
from hybridlm.inference.sampling import SamplingParams, choose_token
from hybridlm.model import HybridLM


@torch.no_grad()
def generate_ids(
    model: HybridLM, prompt_ids: list[int], params: SamplingParams, *, eos_id: int | None
) -> Iterator[int]:
    """Yield new token ids until eos, max_new_tokens or the end of the context."""
    context = model.cfg.max_seq_len
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens but the context is {context}; shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    seen = torch.tensor(prompt_ids, device=device)
    cache = model.new_cache()
    logits = model(seen[None], cache)[0, -1]
    for _ in range(params.max_new_tokens):
        token = choose_token(logits.cpu(), params, seen.cpu(), generator)
        yield token
        if token == eos_id or cache[0].length >= context:
            return
        seen = torch.cat([seen, torch.tensor([token], device=device)])
        logits = model(seen[None, -1:], cache)[0, -1]
