"""Preference pairs: a prompt (a conversation so far) with a chosen and a rejected reply, what
reward models and DPO learn from.

Accepted sources:
- Anthropic hh-rlhf transcripts, one `{"chosen", "rejected"}` per line (`.jsonl` or `.jsonl.gz`),
  each a whole `\\n\\nHuman: ... \\n\\nAssistant: ...` dialogue. The prompt is everything before
  the last `\\n\\nAssistant:`; both sides must share it. A pair where they do not is refused with
  its line number, or left out and listed when data.unshared_pairs = "skip";
- JSONL `{"prompt", "chosen", "rejected"}`: the prompt a string (one user turn) or an OpenAI-style
  message list, each reply a string or a list ending in the assistant's message;
- `stdlib-docs:prefs`, built in: the question of each documented standard-library function
  (`stdlib-docs:qa`), chosen = its first docstring sentence, rejected = the same words shuffled.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from hybridlm.data import stdlib_docs
from hybridlm.errors import UserError
from hybridlm.fileio import jsonl_records
from hybridlm.tokenizer.chat import Message

BUILTIN_PREFS = "stdlib-docs:prefs"
PAIRS_HELD_OUT_PERIOD = 5
"""Through data/instructions.py's held_out_split: pair i (0-based, in file order, after any left
out) is held out when i % 5 == 4, 20% spread through the file, the same on every machine (461 of
hh-rlhf harmless-base test's 2,307 pairs with a shared prompt)."""
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str


@dataclass
class PreferenceSet:
    pairs: list[PreferencePair]
    skipped_lines: list[int] = field(default_factory=list)
    """Lines left out because their two sides do not share a prompt (data.unshared_pairs = "skip")."""


def read_preferences(spec: str, unshared: str = "error") -> PreferenceSet:
    """Every pair of a preference file, or of the built-in pairs."""
    if spec == BUILTIN_PREFS:
        return PreferenceSet(builtin_pairs())
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"preference data not found: {spec}; give a .jsonl/.jsonl.gz file or {BUILTIN_PREFS}")
    found, unshared_lines = PreferenceSet([]), []
    for line, record in jsonl_records(path):
        pair = _pair(record, f"{path}: line {line}")
        if pair is None:
            unshared_lines.append(line)
        else:
            found.pairs.append(pair)
    if unshared_lines and unshared != "skip":
        shown = ", ".join(map(str, unshared_lines[:5])) + (" ..." if len(unshared_lines) > 5 else "")
        raise UserError(f"{path}: {len(unshared_lines)} pair(s) whose chosen and rejected dialogues do not share a "
                        f"prompt (line {shown}); fix them, or set data.unshared_pairs = \"skip\" to leave them out")
    if not found.pairs:
        raise UserError(f"{path} holds no preference pairs")
    found.skipped_lines = unshared_lines
    return found


def builtin_pairs() -> list[PreferencePair]:
    """One pair per documented function: its first docstring sentence over the same words in a
    shuffled order (seeded by the pair's index). A small model can learn this preference (word order
    is what separates them, and it generalises to held-out sentences); preferring one function's
    sentence over another's, which needs the name tied to its meaning, stayed at chance (55.6% held
    out) for a 4-layer, 128-wide reward model trained for 600 steps."""
    pairs = []
    for i, (question, answer) in enumerate(stdlib_docs.qa_pairs()):
        words, rng = answer.split(), random.Random(i)
        shuffled = list(words)
        while shuffled == words and len(set(words)) > 1:
            rng.shuffle(shuffled)
        pairs.append(PreferencePair((Message("user", question),), answer, " ".join(shuffled)))
    return [p for p in pairs if p.chosen != p.rejected]


def split_transcript(text: str, where: str) -> tuple[tuple[Message, ...], str]:
    """(the turns before the last `\\n\\nAssistant:`, the final reply) of one hh-rlhf dialogue."""
    marks = list(_TURN.finditer(text))
    if not marks or marks[-1].group(1) != "Assistant":
        raise UserError(f"{where}: an hh-rlhf dialogue must end with an \\n\\nAssistant: turn")
    turns = []
    for mark, following in zip(marks[:-1], marks[1:]):
        role = "user" if mark.group(1) == "Human" else "assistant"
        turns.append(Message(role, text[mark.end() : following.start()].strip()))
    return tuple(turns), text[marks[-1].end() :].strip()


def _pair(record: object, where: str) -> PreferencePair | None:
    """The pair of one line; None when hh-rlhf sides do not share a prompt."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        return PreferencePair(parse_prompt(record["prompt"], where), parse_reply(record, "chosen", where),
                              parse_reply(record, "rejected", where))
    if not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
        raise UserError(f"{where}: a preference line needs string 'chosen' and 'rejected' "
                        "(hh-rlhf dialogues), plus 'prompt' for the prompt/chosen/rejected form")
    prompt, chosen = split_transcript(record["chosen"], where)
    other, rejected = split_transcript(record["rejected"], where)
    if prompt != other:
        return None
    return PreferencePair(prompt, chosen, rejected)


def parse_prompt(value: object, where: str) -> tuple[Message, ...]:
    if isinstance(value, str) and value.strip():
        return (Message("user", value),)
    if isinstance(value, list) and value:
        return tuple(_message(m, where) for m in value)
    raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def parse_reply(record: dict, key: str, where: str) -> str:
    """A reply string, or the content of the last (assistant) message of a list."""
    value = record.get(key)
    if isinstance(value, list) and value:
        last = _message(value[-1], where)
        if last.role != "assistant":
            raise UserError(f"{where}: the last message of {key!r} must be the assistant's reply")
        return last.content
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string or a list of messages ending in the assistant's")
    return value


def _message(value: object, where: str) -> Message:
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("role", "content")):
        raise UserError(f"{where}: every message needs string 'role' and 'content'")
    try:
        return Message(value["role"], value["content"])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
