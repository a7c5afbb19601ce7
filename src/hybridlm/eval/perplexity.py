"""`eval perplexity`: loss, perplexity and bits per byte of a run on a text file (sliding window)
or a prepared data directory, with train/validation.py's scoring (the figures training validates
with)."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.device import resolve_dtype
from hybridlm.errors import UserError
from hybridlm.model import HybridLM
from hybridlm.train.validation import evaluate_split, scored_nats, summary


def evaluate_text(model: HybridLM, ids: list[int], n_bytes: int, context: int, stride: int, dtype: str) -> dict:
    """Sliding-window metrics over a whole token sequence: each token scored once, with up to
    `context` tokens of history; windows advance by `stride`."""
    if len(ids) < 2:
        raise UserError("the text is too short to evaluate: it needs at least two tokens")
    if not 0 < stride <= context:
        raise UserError(f"stride must be in 1..{context} (got {stride})")
    tensor = torch.tensor(ids)
    nats, tokens, scored_until = 0.0, 0, 0  # targets 1..scored_until are done
    begin = 0
    while scored_until < len(ids) - 1:
        end = min(begin + context + 1, len(ids))
        n_new = end - 1 - scored_until
        nats += scored_nats(model, tensor[begin:end], n_new, dtype)
        tokens += n_new
        scored_until = end - 1
        begin += stride
    return summary(nats, tokens, n_bytes)


def evaluate_path(run, path: Path, stride: int | None) -> dict:
    """Metrics of a loaded run on a text file (sliding window) or a prepared data directory."""
    model, context = run.model, run.model.cfg.max_seq_len
    dtype = resolve_dtype("auto", next(model.parameters()).device)
    path = Path(path)
    if path.is_dir():
        return evaluate_split(model, path, context, 1 << 62, dtype)
    if not path.is_file():
        raise UserError(f"evaluation data not found: {path}; give a text file or a prepared data directory")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"{path} is empty; nothing to evaluate")
    ids = run.tokenizer.encode(text)
    return evaluate_text(model, ids, len(text.encode("utf-8")), context, stride or context, dtype)
