"""The unigram baseline: token frequencies of the training split, scored on validation.

A trained model that does not beat it has learned nothing beyond token counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hybridlm.data.loader import TokenStream


def unigram_bpb(data_dir: Path) -> float:
    """Bits per byte of an add-one-smoothed unigram model fitted on train, measured on val."""
    train, val = TokenStream(data_dir, "train"), TokenStream(data_dir, "val")
    vocab = int(train.meta["vocab_size"])
    counts = np.ones(vocab, dtype=np.float64)
    for shard in train.shards:
        counts += np.bincount(np.asarray(shard), minlength=vocab)[:vocab]
    log_prob = np.log(counts / counts.sum())
    nats = 0.0
    for shard in val.shards:
        val_counts = np.bincount(np.asarray(shard), minlength=vocab)[:vocab]
        nats -= float(val_counts @ log_prob)
    return nats / math.log(2) / val.bytes
