"""Masked-token accuracy: how often a bidirectional model restores the tokens masking hid."""

from __future__ import annotations

import torch

from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX


@torch.no_grad()
def masked_accuracy(model: HybridLM, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[int, int]:
    """(correct, counted): argmax predictions equal to the target, over targets that are not
    IGNORE_INDEX. Counts rather than a ratio, so batches of any size sum exactly. Runs the model
    with causal=False, in whatever train/eval mode it is in."""
    device = next(model.parameters()).device
    return masked_hits(model(inputs_BT.to(device), causal=False), targets_BT.to(device))


def masked_hits(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) from logits already computed (e.g. by an evaluation that also wants the loss)."""
    scored_BT = targets_BT != IGNORE_INDEX
    correct = (logits_BTV.argmax(-1) == targets_BT) & scored_BT
    return int(correct.sum()), int(scored_BT.sum())
