"""Prefix caching: prompts that share a prefix (a system prompt, few-shot examples, a chat history)
reuse its per-layer cache state instead of computing it again.

The scheduler prefills every prompt in chunks at fixed offsets, multiples of `block`. After each
full block it stores one entry: the dense layers' keys and values of that block, and each sparse
layer's whole state at the block's end (its rolling window and the strided keys that left it:
O(window + T/stride), so a copy per block is cheap). A later prompt whose first k blocks are the
same tokens restores them and prefills the rest in the same chunks, the same arithmetic on the
same numbers: its tokens are exactly those of an uncached run.

An entry's key is a SHA-256 of its parent's key and its own tokens (vLLM's block hash), so a key
names the whole prefix. Memory is bounded in bytes, least recently used first out. A store or a
hit touches the deepest block first and its ancestors after, so a prefix's last blocks are
evicted before the blocks they extend (an entry whose parent is gone could not be reached).
"""

from __future__ import annotations

import copy
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hybridlm.errors import UserError
from hybridlm.model.kv_cache import DenseKVCache, SparseKVCache
from hybridlm.model.transformer import LayerCache

_ROOT = b"hybridlm-prefix"


@dataclass
class _Entry:
    """One block: per layer, (keys, values) of the block for a dense layer or the state at the
    block's end for a sparse one."""

    layers: list[tuple[torch.Tensor, torch.Tensor] | SparseKVCache]
    nbytes: int


def block_keys(ids: list[int], block: int) -> list[bytes]:
    """The key of every full block of `ids`, in order (each hashes its parent's key and its tokens)."""
    keys, parent = [], _ROOT
    for start in range(0, len(ids) - block + 1, block):
        parent = hashlib.sha256(parent + array("q", ids[start : start + block]).tobytes()).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Cached blocks of prefilled prompts, at most `budget_bytes` of tensors (see the module docstring)."""

    def __init__(self, block: int, budget_bytes: int) -> None:
        if block <= 0 or budget_bytes <= 0:
            raise UserError(f"a prefix cache needs block > 0 and a budget > 0 (got {block}, {budget_bytes})")
        self.block, self.budget = block, budget_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.evictions = 0
        self.prompt_tokens = self.tokens_saved = 0

    def restore(self, ids: list[int], fresh: list[LayerCache]) -> int:
        """Fill the empty caches `fresh` with the longest cached prefix of `ids` that leaves at
        least one token to prefill (its logits start the reply); returns that prefix's length."""
        keys = block_keys(ids[:-1], self.block)
        found = 0
        while found < len(keys) and keys[found] in self._entries:
            found += 1
        self.lookups += 1
        self.prompt_tokens += len(ids)
        if not found:
            return 0
        self._touch(keys[:found])
        entries = [self._entries[key] for key in keys[:found]]
        for layer, cache in enumerate(fresh):
            if isinstance(cache, DenseKVCache):
                for entry in entries:
                    cache.append(*entry.layers[layer])
            else:
                fresh[layer] = copy.deepcopy(entries[-1].layers[layer])
        self.hits += 1
        self.tokens_saved += found * self.block
        return found * self.block

    def store(self, ids: list[int], caches: list[LayerCache], end: int) -> None:
        """Keep the block ending at `end` (a multiple of the block size) of a prompt whose caches
        have just reached `end`."""
        if end % self.block or end > len(ids) or caches[0].length != end:
            raise ValueError(f"can only store a full block ending where the caches are (end={end})")
        keys = block_keys(ids[:end], self.block)
        key = keys[-1]
        if key in self._entries:
            self._touch(keys)
            return
        layers = [cache.block(end - self.block, end) if isinstance(cache, DenseKVCache) else copy.deepcopy(cache)
                  for cache in caches]
        entry = _Entry(layers, sum(_nbytes(layer) for layer in layers))
        if entry.nbytes > self.budget:
            return
        while self.bytes + entry.nbytes > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = entry
        self.bytes += entry.nbytes
        self._touch(keys)

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a prefix used, deepest block first, so its ancestors are the more recent."""
        for key in reversed(keys):
            if key in self._entries:
                self._entries.move_to_end(key)

    def stats(self) -> dict:
        """Counters for /metrics: lookups, hits, tokens saved (of prompt tokens looked up), bytes, entries."""
        return {"lookups": self.lookups, "hits": self.hits, "prompt_tokens": self.prompt_tokens,
                "tokens_saved": self.tokens_saved, "bytes": self.bytes, "entries": len(self._entries),
                "evictions": self.evictions}


def _nbytes(layer: tuple[torch.Tensor, torch.Tensor] | SparseKVCache) -> int:
    if isinstance(layer, SparseKVCache):
        return layer.nbytes()
    return sum(t.nelement() * t.element_size() for t in layer)
