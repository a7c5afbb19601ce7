"""Token-id generation with per-layer KV caches: prefill (optionally in chunks), then one token
per step, for one sequence or for n samples of the same prompt decoded as one batch.

The model runs in its own parameter dtype (load it in bf16 for fast CPU decoding): autocast
would cast every weight again at every step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from hybridlm.errors import UserError
from hybridlm.inference.sampling import SamplingParams, choose_token
from hybridlm.model import HybridLM


def _check_prompt(model: HybridLM, prompt_ids: list[int]) -> None:
    context = model.cfg.max_seq_len
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens but the context is {context}; shorten the prompt")


def prefill(model: HybridLM, ids_BT: torch.Tensor, cache: list, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt through the model into `cache`, `chunk` tokens at a time (bounds the
    activation memory of long prompts); returns the last position's logits (B, vocab)."""
    step = chunk or ids_BT.shape[1]
    for start in range(0, ids_BT.shape[1], step):
        logits = model(ids_BT[:, start : start + step], cache)
    return logits[:, -1]


def sampling_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from the OS when None (torch's global RNG untouched)."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.no_grad()
def generate_ids(
    model: HybridLM, prompt_ids: list[int], params: SamplingParams, *, eos_id: int | None,
    prefill_chunk: int | None = None,
) -> Iterator[int]:
    """Yield new token ids until eos, max_new_tokens or the end of the context."""
    _check_prompt(model, prompt_ids)
    device = next(model.parameters()).device
    generator = sampling_generator(params.seed)
    seen = torch.tensor(prompt_ids, device=device)
    cache = model.new_cache()
    logits = prefill(model, seen[None], cache, prefill_chunk)[0]
    for _ in range(params.max_new_tokens):
        token = choose_token(logits.cpu(), params, seen.cpu(), generator, len(prompt_ids))
        yield token
        if token == eos_id or cache[0].length >= model.cfg.max_seq_len:
            return
        seen = torch.cat([seen, torch.tensor([token], device=device)])
        logits = model(seen[None, -1:], cache)[0, -1]


@torch.no_grad()
def generate_samples(
    model: HybridLM, prompt_ids: list[int], params: SamplingParams, *, n: int, eos_id: int | None,
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """n continuations of one prompt, decoded together as a batch of n. Sample i draws from the
    seed params.seed + i, so sample 0 equals what generate_ids returns with the same params."""
    _check_prompt(model, prompt_ids)
    if n <= 0:
        raise UserError(f"n must be > 0 (got {n})")
    device = next(model.parameters()).device
    base = params.seed if params.seed is not None else torch.seed() % 2**62
    generators = [sampling_generator(base + i) for i in range(n)]
    seen = torch.tensor(prompt_ids, device=device).expand(n, -1)
    cache = model.new_cache()
    logits = prefill(model, seen, cache, prefill_chunk)
    outputs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(params.max_new_tokens):
        tokens = [choose_token(logits[i].cpu(), params, seen[i].cpu(), generators[i], len(prompt_ids))
                  for i in range(n)]
        for i, token in enumerate(tokens):
            if not done[i]:
                outputs[i].append(token)
                done[i] = token == eos_id
        if all(done) or cache[0].length >= model.cfg.max_seq_len:
            break
        step = torch.tensor(tokens, device=device)[:, None]
        seen = torch.cat([seen, step], dim=1)
        logits = model(step, cache)[:, -1]
    return outputs
