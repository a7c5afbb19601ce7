"""Next-token choice: logit bias, repetition / presence / frequency penalties, a grammar's mask,
temperature, top-k, min-p, top-p (nucleus), greedy at T=0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.errors import UserError
from hybridlm.inference.grammar import Grammar

GREEDY_BELOW = torch.finfo(torch.float32).smallest_normal
"""Temperatures below this (0, or too small for float32) pick the argmax."""
MIN_REPETITION_PENALTY = 0.01
"""Penalties are kept within [0.01, 100]: dividing logits by a vanishing one overflows to inf."""


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (after temperature); 0 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style: positive logits divided,
    negative multiplied)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token the output already holds (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output already holds it."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, value) pairs added to the logits before anything else."""
    top_logprobs: int | None = None
    """Report each chosen token's log-probability and the `top_logprobs` most likely alternatives
    (0: the chosen one alone), of the model's own distribution before any adjustment; None: none."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    """The reply must match this grammar (a JSON schema, a tool call): each choice gets a matcher."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 1 / MIN_REPETITION_PENALTY:
            raise UserError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {1 / MIN_REPETITION_PENALTY:g}] "
                            f"(got {self.repetition_penalty}); 1 turns it off")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (got {self.min_p})")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise UserError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not -100 <= value <= 100 for _, value in self.logit_bias):
            raise UserError("logit_bias values must be in [-100, 100]")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise UserError(f"top_logprobs must be >= 0 (got {self.top_logprobs})")

    @property
    def uses_history(self) -> bool:
        """Whether a choice depends on the tokens seen so far (then callers must pass them)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def adjusted_logits(logits_V: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The logits the choice is made from, in vLLM's order: logit_bias, then the repetition penalty
    (over prompt and output, `seen_ids`), then presence and frequency penalties (over the output,
    `seen_ids[n_prompt:]`). Temperature and truncation come after, in choose_token."""
    logits_V = logits_V.float().clone()
    if params.logit_bias:  # one indexed add: a loop costs a tensor op per entry per token (up to 1,024)
        tokens, values = zip(*params.logit_bias)
        logits_V[list(tokens)] += torch.tensor(values)
    if params.repetition_penalty != 1.0 and seen_ids.numel():
        prior = logits_V[seen_ids]
        logits_V[seen_ids] = torch.where(prior > 0, prior / params.repetition_penalty, prior * params.repetition_penalty)
    output = seen_ids[n_prompt:]
    if output.numel() and (params.presence_penalty or params.frequency_penalty):
        counts_V = torch.bincount(output, minlength=logits_V.numel()).float()
        logits_V -= params.frequency_penalty * counts_V + params.presence_penalty * (counts_V > 0).float()
    return logits_V


def choose_token(
    logits_V: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor, generator: torch.Generator,
    n_prompt: int = 0, allowed_V: torch.Tensor | None = None,
) -> int:
    """Pick the next token id from one row of logits; `seen_ids` are the prompt's `n_prompt` ids
    and then the output's. With `allowed_V` (a grammar's mask), only allowed tokens can be picked:
    the others leave the distribution before temperature and truncation."""
    logits_V = adjusted_logits(logits_V, params, seen_ids, n_prompt)
    if allowed_V is not None:
        logits_V = logits_V.masked_fill(~allowed_V, float("-inf"))
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
    if params.min_p:  # after top-k and top-p, as vLLM applies it
        probs_V[probs_V < params.min_p * probs_V.max()] = 0.0
    return int(torch.multinomial(probs_V, 1, generator=generator))


def token_logprobs(logits_V: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` and the `top` most likely (id, log-probability) pairs under
    the raw logits: before bias, penalties, temperature and truncation (what vLLM reports too)."""
    logprobs_V = torch.log_softmax(logits_V.float(), dim=-1)
    best = torch.topk(logprobs_V, min(top, logprobs_V.numel())) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return float(logprobs_V[token]), pairs
