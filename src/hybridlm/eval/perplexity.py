"""Loss, perplexity and bits per byte of a model on token windows, a prepared split or a text file.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the text scored, so models with
different tokenizers compare fairly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlm.data.loader import TokenStream, eval_windows
from hybridlm.device import autocast, resolve_dtype
from hybridlm.errors import UserError
from hybridlm.model import HybridLM


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
