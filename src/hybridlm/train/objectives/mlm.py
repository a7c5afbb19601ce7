"""Masked language modelling: RoBERTa masking of prepared windows, bidirectional attention, loss
on the masked positions; validated by loss and masked-token accuracy on fixed masked windows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hybridlm.data.loader import TokenStream, eval_windows
from hybridlm.data.masking import mask_tokens
from hybridlm.errors import UserError
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.objectives.base import Evaluator, Rows, SourceSet, StepContext
from hybridlm.train.objectives.clm import CausalLM, prepared_sources
from hybridlm.train.validation import masked_loss_and_accuracy

if TYPE_CHECKING:
    from hybridlm.train.config import RunConfig


def mask_rows(x_BT: torch.Tensor, first_row: int, seed: int, tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa masking of rows numbered first_row..: each row's pattern comes from (seed, row), so it
    is new for every row drawn (dynamic masking) and the same for any split over ranks."""
    specials = sorted(set(tokenizer.special_ids.values()))
    rows = [mask_tokens(x_BT[i : i + 1], torch.Generator().manual_seed(seed * 1_000_003 + first_row + i),
                        mask_id=tokenizer.special_ids["mask"], vocab_size=tokenizer.vocab_size, never_mask=specials)
            for i in range(x_BT.shape[0])]
    inputs, targets = zip(*rows)
    return torch.cat(inputs), torch.cat(targets)


def masked_evaluator(data_dir: Path, cfg: RunConfig, tokenizer: TextTokenizer) -> Evaluator:
    """Validation windows masked with a fixed seed, so every evaluation scores the same positions."""
    seq_len = cfg.data.seq_len
    whole = [w[:seq_len] for w in eval_windows(TokenStream(data_dir, "val"), seq_len, cfg.eval.tokens)
             if len(w) > seq_len]
    if not whole:
        raise UserError(f"{data_dir} has fewer than {seq_len + 1} validation tokens; lower data.seq_len")
    x_BT, y_BT = mask_rows(torch.stack(whole).long(), 0, cfg.train.seed, tokenizer)
    return lambda model, dtype: masked_loss_and_accuracy(model, x_BT, y_BT, dtype)


class MaskedLM(CausalLM):
    """Reads what clm reads; masks every row it draws and attends both ways."""

    name = "mlm"
    causal = False

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        return prepared_sources(cfg, tokenizer, masked_evaluator)

    def batch(self, rows: Rows, first_row: int, ctx: StepContext) -> Rows:
        return mask_rows(rows[0], first_row, ctx.cfg.train.seed, ctx.tokenizer)
