"""Next-token choice: repetition penalty, temperature, top-k, top-p (nucleus), greedy at T=0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.errors import UserError

GREEDY_BELOW = torch.finfo(torch.float32).smallest_normal
"""Temperatures below this (0, or too small for float32) pick the argmax."""


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style)."""
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise UserError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0")


def choose_token(
    logits_V: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor, generator: torch.Generator
) -> int:
    """Pick the next token id from one row of logits."""
    logits_V = logits_V.float().clone()
    if params.repetition_penalty != 1.0 and seen_ids.numel():
        prior = logits_V[seen_ids]
        logits_V[seen_ids] = torch.where(prior > 0, prior / params.repetition_penalty, prior * params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return int(logits_V.argmax())
    # Shift so the largest logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (a one-hot softmax) instead of overflowing every logit to inf (NaN probabilities).
    logits_V = (logits_V - logits_V.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits_V, min(params.top_k, logits_V.numel())).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    probs_V = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs_V.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep tokens until the mass reaches top_p
        sorted_p[outside] = 0.0
        probs_V = torch.zeros_like(probs_V).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))
