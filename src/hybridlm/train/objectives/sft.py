"""Supervised fine-tuning on conversations: instruction files or `stdlib-docs:qa`, rendered with
the chat template, loss on the assistant replies only; the conversations data/instructions.py's
held_out_split picks are kept for validation (their reply loss)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.data.instructions import BUILTIN_QA, held_out_split, read_conversations
from hybridlm.data.mixture import ExampleSource, padded_row
from hybridlm.fileio import sha256_file
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.chat import render_chat
from hybridlm.train.objectives.base import Objective, SourceSet
from hybridlm.train.validation import padded_rows_loss

if TYPE_CHECKING:
    from hybridlm.train.config import RunConfig


class InstructionTuning(Objective):
    name = "sft"
    reads_prepared = False

    def check_source(self, spec: str, cfg: RunConfig) -> None:
        if spec != BUILTIN_QA:  # built-in question/answer pairs are generated, not read
            read_conversations(spec)

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        found = SourceSet()
        pad = tokenizer.special_ids["pad"]
        for spec, weight in cfg.data.weights().items():
            rendered = [render_chat(tokenizer, c) for c in read_conversations(spec)]
            held_out, train = held_out_split(rendered)
            found.rows[spec] = ExampleSource(train, pad)
            rows = [padded_row(ids, trained, cfg.data.seq_len, pad) for ids, trained in held_out or train]
            found.evaluators[spec] = lambda model, dtype, rows=rows: padded_rows_loss(model, rows, dtype)
            found.lineage.append({"spec": spec, "weight": weight, "examples": len(rendered),
                                  "held_out": len(held_out),
                                  "sha256": None if spec == BUILTIN_QA else sha256_file(Path(spec))})
        return found
