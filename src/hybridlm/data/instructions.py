"""Instruction data as conversations: Alpaca JSON/JSONL, OpenAI-style `messages` JSONL, and the
built-in question/answer pairs of `stdlib-docs:qa`.

Accepted records (one per JSONL line, or the items of a JSON array):
- `{"instruction", "input" (optional), "output"}` (Alpaca): the user turn is the instruction,
  followed by the input after a blank line when there is one; the output is the reply;
- `{"instruction", "instances": [{"input", "output"}, ...]}` (self-instruct seed tasks): one
  conversation per instance;
- `{"messages": [{"role", "content"}, ...]}` with roles system/user/assistant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from hybridlm.data import stdlib_docs
from hybridlm.errors import UserError
from hybridlm.fileio import jsonl_records
from hybridlm.tokenizer.chat import Message

BUILTIN_QA = "stdlib-docs:qa"
Conversation = list[Message]


def read_conversations(spec: str) -> list[Conversation]:
    """All conversations of a file, or of the built-in question/answer pairs."""
    if spec == BUILTIN_QA:
        return [[Message("user", q), Message("assistant", a)] for q, a in stdlib_docs.qa_pairs()]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"instruction data not found: {spec}; give a .json/.jsonl file or {BUILTIN_QA}")
    conversations = [c for where, record in _records(path) for c in _conversations(record, f"{path}: {where}")]
    if not conversations:
        raise UserError(f"{path} holds no instruction examples")
    return conversations


def _records(path: Path) -> Iterator[tuple[str, object]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); a .json file must hold one array") from None
        if not isinstance(items, list):
            raise UserError(f"{path} must hold a JSON array of records (or use .jsonl, one record per line)")
        yield from ((f"record {i + 1}", item) for i, item in enumerate(items))
        return
    yield from ((f"line {number}", record) for number, record in jsonl_records(path))


def _conversations(record: object, where: str) -> list[Conversation]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return [_messages(record["messages"], where)]
    instruction = _text(record, "instruction", where)
    if "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise UserError(f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
        return [_alpaca(instruction, inst, where) for inst in instances]
    return [_alpaca(instruction, record, where)]


def _alpaca(instruction: str, record: object, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise UserError(f"{where}: each instance must be an object with input and output")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: 'input' must be a string")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [Message("user", prompt), Message("assistant", _text(record, "output", where, allow_empty=True))]


def _messages(messages: object, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message needs string 'role' and 'content'")
        try:
            out.append(Message(m["role"], m["content"]))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if not any(m.role == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message to learn from")
    return out


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    """A string field; an empty reply is allowed (it still teaches where a reply ends)."""
    value = record.get(key)
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise UserError(f"{where}: missing or empty string field {key!r}")
    return value


HELD_OUT_PERIOD = 20
"""Every HELD_OUT_PERIOD-th conversation of an instruction source is held out: instruction tuning
validates on them and `eval run`'s generation tasks score them."""


def held_out_split(items: list, period: int = HELD_OUT_PERIOD) -> tuple[list, list]:
    """(held out, the rest): every period-th item is held out, order kept."""
    held = [c for i, c in enumerate(items) if i % period == period - 1]
    rest = [c for i, c in enumerate(items) if i % period != period - 1]
    return held, rest
