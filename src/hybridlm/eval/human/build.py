"""`hybridlm eval human build`: both runs reply to the same prompts, and the replies become a
study's blind cards.

The prompts are the conversations of an instruction file (any file data/instructions.py reads),
each cut before its last assistant reply. Replies are greedy, rendered with the chat template, as
the generation tasks make them. The shuffle (which reply comes first; in a rating study, the order
of the cards) is drawn from --seed, so a study can be rebuilt exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

from hybridlm.data.instructions import Conversation, read_conversations
from hybridlm.errors import UserError
from hybridlm.eval.human.store import Card, Study, write_study
from hybridlm.eval.tasks.generation import chat_replies


def prompts_of(spec: str, limit: int | None) -> list[Conversation]:
    """Each conversation up to (not including) its last assistant reply; those with no user turn dropped."""
    prompts = []
    for conversation in read_conversations(spec):
        while conversation and conversation[-1].role == "assistant":
            conversation = conversation[:-1]
        if any(m.role == "user" for m in conversation):
            prompts.append(conversation)
    if not prompts:
        raise UserError(f"{spec} holds no conversation with a user turn to reply to")
    return prompts if limit is None else prompts[:limit]


def make_cards(mode: str, prompts: list[Conversation], replies_a: list[str], replies_b: list[str],
               seed: int) -> list[Card]:
    rng = random.Random(seed)
    messages = [[{"role": m.role, "content": m.content} for m in prompt] for prompt in prompts]
    if mode == "pairwise":
        cards = []
        for number, (prompt, a, b) in enumerate(zip(messages, replies_a, replies_b), start=1):
            a_first = rng.random() < 0.5
            cards.append(Card(number, prompt, a if a_first else b, b if a_first else a, "a" if a_first else "b"))
        return cards
    singles = [(prompt, reply, side) for prompt, a, b in zip(messages, replies_a, replies_b)
               for reply, side in ((a, "a"), (b, "b"))]
    rng.shuffle(singles)
    return [Card(number, prompt, reply, None, side) for number, (prompt, reply, side) in enumerate(singles, start=1)]


def build_study(model_a: Path, model_b: Path, prompts_spec: str, out: Path, *, mode: str, limit: int | None,
                max_new_tokens: int, seed: int, dtype: str, labels: tuple[str, str] | None = None) -> Study:
    from hybridlm.eval.scoring import Scorer

    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be > 0 (got {limit})")
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0 (got {max_new_tokens})")
    if Path(out).exists():
        raise UserError(f"{out} exists; give a new --out (a study's ratings are never overwritten)")
    prompts = prompts_of(prompts_spec, limit)
    replies = [chat_replies(Scorer.from_path(model, dtype=dtype), prompts, max_new_tokens) for model in (model_a, model_b)]
    labels = labels or (str(model_a), str(model_b))
    return write_study(out, mode, labels, make_cards(mode, prompts, *replies, seed))
