"""Generation tasks on held-out instruction examples, scored with BLEU, ROUGE-L, METEOR and exact match.

`gen:PATH` takes any instruction file data/instructions.py reads; `alpaca_gen` is the Code
Alpaca 2k file in shared/data. The items are the conversations instruction tuning holds out
(data/instructions.py's held_out_split), so a model tuned on the same file is scored on
examples it never trained on; shots come from the others, as earlier turns of the chat.
The prompt is the conversation up to its last reply, rendered with the chat template and a
generation prompt; the model decodes greedily until its end-of-turn marker, and the reference
is the last reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridlm.data.instructions import (
    HELD_OUT_PERIOD,
    Conversation,
    held_out_split,
    read_conversations,
)
from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file, draw_shots, limited
from hybridlm.eval.tasks.metrics import (
    bleu,
    bootstrap_stderr,
    exact_match,
    meteor,
    require_eval_extra,
    rouge_l,
    summarise,
)
from hybridlm.tokenizer.chat import render_chat

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

PREFIX = "gen:"
ALPACA_FILE = "instruct/codealpaca/code_alpaca_2k.json"


def chat_replies(scorer: Scorer, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
    """Greedy replies to conversations rendered with the chat template, each until its end-of-turn."""
    tokenizer = scorer.tokenizer
    prompt_ids = [render_chat(tokenizer, messages, add_generation_prompt=True)[0] for messages in conversations]
    return scorer.generate_ids_until(prompt_ids, max_new_tokens, [], tokenizer.special_ids["end"])


@dataclass
class GenerationTask:
    prompts: list[Conversation]
    references: list[str]
    max_new_tokens: int

    def score(self, scorer: Scorer) -> dict:
        predictions = chat_replies(scorer, self.prompts, self.max_new_tokens)
        metrics, stderr = summarise({"rouge_l": rouge_l(predictions, self.references),
                                     "meteor": meteor(predictions, self.references),
                                     "exact_match": exact_match(predictions, self.references)})
        pairs = list(zip(predictions, self.references))
        metrics["bleu"] = bleu(predictions, self.references)
        bleu_stderr = bootstrap_stderr(lambda sample: bleu([p for p, _ in sample], [r for _, r in sample]), pairs)
        if bleu_stderr is not None:
            stderr["bleu"] = bleu_stderr
        return {"metrics": metrics, "n": len(pairs), "stderr": stderr}


def prepare_conversations(name: str, conversations: list[Conversation], options: EvalOptions) -> GenerationTask:
    require_eval_extra()
    held, rest = held_out_split(conversations)
    if not held:
        raise UserError(f"{name} has {len(conversations)} examples, fewer than the {HELD_OUT_PERIOD} it takes to "
                        f"hold one out")
    chosen = limited(held, options.limit)
    for conversation in chosen:
        if conversation[-1].role != "assistant":
            raise UserError(f"{name}: a held-out conversation does not end with an assistant reply to score")
    shots = draw_shots(name, len(chosen), len(rest), options.shots, options.seed, from_items=False)
    prompts = [[m for j in picks for m in rest[j]] + conversation[:-1] for conversation, picks in zip(chosen, shots)]
    return GenerationTask(prompts, [c[-1].content for c in chosen], options.max_new_tokens)


def prepare_file(spec: str, options: EvalOptions) -> GenerationTask:
    """`gen:PATH`: held-out examples of any instruction file (.json / .jsonl)."""
    return prepare_conversations(spec, read_conversations(spec[len(PREFIX) :]), options)


def prepare_alpaca(options: EvalOptions) -> GenerationTask:
    return prepare_conversations("alpaca_gen", read_conversations(str(data_file(options, ALPACA_FILE))), options)
