"""Prepared token shards as one memory-mapped array per split, and evaluation windows over it.

Training batches are drawn by data/mixture.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hybridlm.data.prepare import load_meta
from hybridlm.errors import UserError


class TokenStream:
    """The tokens of one split as one logical array over memory-mapped shards."""

    def __init__(self, data_dir: Path, split: str) -> None:
        self.meta = load_meta(data_dir)
        info = self.meta["splits"].get(split)
        if not info or info["tokens"] == 0:
            raise UserError(f"{data_dir} has no {split!r} tokens; prepare more data or another split")
        dtype = np.dtype(self.meta["dtype"])
        self.shards = []
        for shard in info["shards"]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or truncated; rerun `hybridlm prepare`")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.tokens = int(self.starts[-1])
        self.bytes = int(info["bytes"])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries when needed."""
        pieces, pos, end = [], start, start + length
        while pos < end:
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            offset = pos - int(self.starts[shard])
            take = min(end - pos, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset : offset + take])
            pos += take
        return np.concatenate(pieces).astype(np.int64)


def eval_windows(stream: TokenStream, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of seq_len + 1 tokens from the start of the split."""
    windows = []
    for start in range(0, stream.tokens - 1, seq_len):
        if len(windows) * seq_len >= max_tokens:
            break
        length = min(seq_len + 1, stream.tokens - start)
        if length < 2:
            break
        windows.append(torch.from_numpy(stream.window(start, length)))
    return windows
