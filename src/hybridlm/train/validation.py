"""Validation figures of a model: loss, perplexity and bits per byte on token windows or a prepared
split, masked-token accuracy, and the loss on held-out padded examples. The objectives validate
with them during training; `eval perplexity` and the quickstart report them after it.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the text scored, so models with
different tokenizers compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.data.loader import TokenStream, eval_windows
from hybridlm.data.pair_rows import EncodedPair, pair_batches
from hybridlm.device import autocast
from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX

EVAL_BATCH = 16


@torch.no_grad()
def scored_nats(model: HybridLM, ids: torch.Tensor, n_scored: int, dtype: str) -> float:
    """Summed next-token loss (nats) of the last `n_scored` predictions in the 1-D window `ids`."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    with autocast(dtype, device):
        logits = model(ids[None, :-1])[0]
    targets = ids[1:]
    loss = F.cross_entropy(logits[-n_scored:].float(), targets[-n_scored:], reduction="sum")
    return float(loss)


def summary(nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / math.log(2) / max(n_bytes, 1),
        "tokens": tokens,
        "bytes": n_bytes,
    }


def evaluate_split(model: HybridLM, data_dir: Path, seq_len: int, max_tokens: int, dtype: str) -> dict:
    """Metrics on the first `max_tokens` of a prepared validation split (bytes pro rata)."""
    stream = TokenStream(data_dir, "val")
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    for window in eval_windows(stream, seq_len, max_tokens):
        nats += scored_nats(model, window, len(window) - 1, dtype)
        tokens += len(window) - 1
    model.train(was_training)
    return summary(nats, tokens, round(stream.bytes * tokens / max(stream.tokens - 1, 1)))


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


@torch.no_grad()
def masked_loss_and_accuracy(model: HybridLM, x_BT: torch.Tensor, y_BT: torch.Tensor, dtype: str) -> dict:
    """Loss and accuracy over the masked positions of fixed masked rows, one bidirectional forward
    per batch for both."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, correct, counted = 0.0, 0, 0
    for i in range(0, len(x_BT), EVAL_BATCH):
        x, y = x_BT[i : i + EVAL_BATCH].to(device), y_BT[i : i + EVAL_BATCH].to(device)
        with autocast(dtype, device):
            logits_BTV = model(x, causal=False)
        scored = y != IGNORE_INDEX
        nats += float(F.cross_entropy(logits_BTV[scored].float(), y[scored], reduction="sum"))
        hits, count = masked_hits(logits_BTV, y)
        correct, counted = correct + hits, counted + count
    model.train(was_training)
    return {"loss": nats / max(counted, 1), "accuracy": correct / max(counted, 1), "tokens": counted}


@torch.no_grad()
def padded_rows_loss(model: HybridLM, rows: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> dict:
    """Mean loss per scored target over (inputs, targets) rows padded to one length (held-out
    instruction examples: only the replies are scored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    for i in range(0, len(rows), EVAL_BATCH):
        x, y = (torch.from_numpy(np.stack(p)).to(device) for p in zip(*rows[i : i + EVAL_BATCH]))
        count = int((y != IGNORE_INDEX).sum())
        with autocast(dtype, device):
            nats += float(model(x, targets_BT=y)) * count
        tokens += count
    model.train(was_training)
    return {"loss": nats / max(tokens, 1), "tokens": tokens}


@torch.no_grad()
def pair_scores(model: HybridLM, pairs: list[EncodedPair], seq_len: int, pad_id: int, dtype: str,
                score: Callable[[HybridLM, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`score(model, ids, targets, last)` -> one value per row, for both sides of every preference
    pair (rows as data/pair_rows.py makes them), as (N, 2) float64 (chosen, rejected); eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    found = []
    for ids, targets, last in pair_batches(pairs, seq_len, pad_id, EVAL_BATCH):
        with autocast(dtype, device):
            values = score(model, ids.flatten(0, 1).to(device), targets.flatten(0, 1).to(device),
                           last.flatten().to(device))
        found.append(values.view(-1, 2).double().cpu())
    model.train(was_training)
    return torch.cat(found)
