"""Decoding caches. Dense layers keep every key; sparse layers keep only what they can still see.

A sparse layer's cache holds the last window-1 keys (the rolling local run) plus the strided
summary keys that have left the window, so its size is O(window + T/stride); the global slots
are parameters and are not copied.
"""

from __future__ import annotations

import copy

import torch

from hybridlm.model.attention import (
    dense_causal_attention,
    first_strided_position,
    sparse_causal_attention,
    strided_positions,
)
from hybridlm.model.decode_kernel_bf16 import attention_applies, decode_attention_bf16


class DenseKVCache:
    """Full key/value history in a buffer sized for the whole context."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k_BHSD: torch.Tensor | None = None
        self.v_BHSD: torch.Tensor | None = None

    def attend(self, q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
        self.append(k_BHTD, v_BHTD)
        return dense_causal_attention(q_BHTD, self.k_BHSD[:, :, : self.length], self.v_BHSD[:, :, : self.length])

    def append(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None:
        """Add keys and values after the ones held (attend does this; a prefix cache restores blocks with it)."""
        if self.k_BHSD is None:
            shape = (*k_BHTD.shape[:2], self.max_len, k_BHTD.shape[3])
            self.k_BHSD = k_BHTD.new_empty(shape)
            self.v_BHSD = v_BHTD.new_empty(shape)
        end = self.length + k_BHTD.shape[2]
        self.k_BHSD[:, :, self.length : end] = k_BHTD
        self.v_BHSD[:, :, self.length : end] = v_BHTD
        self.length = end

    def decode_slot(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int] | None:
        """For the fused decode step (decode_step.py): the buffer, whose positions [0, length] the
        new token sees once its key is written at `length`; None before the first append."""
        if self.k_BHSD is None:
            return None
        return [self.k_BHSD], [self.v_BHSD], 0, self.length

    def commit_slot(self) -> None:
        """The fused step wrote one key and value at `length`."""
        self.length += 1

    def block(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of positions [start, end) (what a prefix cache keeps)."""
        if self.k_BHSD is None or not 0 <= start < end <= self.length:
            raise ValueError(f"positions [{start}, {end}) are not in this cache (it holds {self.length})")
        return self.k_BHSD[:, :, start:end].clone(), self.v_BHSD[:, :, start:end].clone()

    def nbytes(self) -> int:
        """Bytes of cached keys and values actually in use."""
        if self.k_BHSD is None:
            return 0
        per_pos = self.k_BHSD[:, :, :1].nelement() * self.k_BHSD.element_size()
        return 2 * per_pos * self.length


class SparseKVCache:
    """Rolling local run + evicted strided keys for one sparse layer.

    The run lives in a buffer with room for a window more keys than it holds, so a decode step
    writes its key in place and the run's start moves forward: the buffer is copied only when it
    fills, once per window of steps, not at every step."""

    def __init__(self, window: int, stride: int) -> None:
        self.window, self.stride = window, stride
        self.length = 0  # tokens seen so far
        self.run_start = 0  # absolute position of run_k[:, :, 0]
        self.run_k = self.run_v = self.far_k = self.far_v = None
        self._buffer_k = self._buffer_v = None
        self._offset = 0  # run_k is _buffer_k[:, :, _offset : _offset + run length]

    def attend(
        self,
        q_BHTD: torch.Tensor,
        k_BHTD: torch.Tensor,
        v_BHTD: torch.Tensor,
        k_global_BHGD: torch.Tensor | None,
        v_global_BHGD: torch.Tensor | None,
    ) -> torch.Tensor:
        run_k, run_v = self._extend_run(k_BHTD, v_BHTD)
        extra_k = [t for t in (k_global_BHGD, self.far_k) if t is not None]
        extra_v = [t for t in (v_global_BHGD, self.far_v) if t is not None]
        if q_BHTD.shape[2] == 1:  # one new token sees every key this cache holds: no mask needed
            keys, values = [*extra_k, run_k], [*extra_v, run_v]
            if attention_applies(q_BHTD, keys):  # the key sets as they are, nothing concatenated
                out = decode_attention_bf16(q_BHTD, keys, values)
            else:
                out = dense_causal_attention(q_BHTD, torch.cat(keys, 2), torch.cat(values, 2))
            self._roll(run_k, run_v, self.length + 1)
            return out
        out = sparse_causal_attention(
            q_BHTD, run_k, run_v, window=self.window, stride=self.stride,
            q_start=self.length, k_start=self.run_start,
            k_extra_BHED=torch.cat(extra_k, 2) if extra_k else None,
            v_extra_BHED=torch.cat(extra_v, 2) if extra_v else None,
        )
        self._roll(run_k, run_v, self.length + k_BHTD.shape[2])
        return out

    def decode_slot(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int] | None:
        """For the fused decode step (decode_step.py): the strided store (when it holds keys) and
        the run's buffer, whose positions [start of the run, slot] the new token sees once its key
        is written at `slot`; None before the first append."""
        if self._buffer_k is None:
            return None
        end = self._make_room(1, self._buffer_k, self._buffer_v)
        if self.far_k is None:
            return [self._buffer_k], [self._buffer_v], self._offset, end
        return [self.far_k, self._buffer_k], [self.far_v, self._buffer_v], self._offset, end

    def commit_slot(self) -> None:
        """The fused step wrote one key and value after the run: roll the run forward."""
        end = self._offset + self.run_k.shape[2] + 1
        self._roll(self._buffer_k[:, :, self._offset : end], self._buffer_v[:, :, self._offset : end], self.length + 1)

    def _make_room(self, new: int, like_k: torch.Tensor, like_v: torch.Tensor) -> int:
        """Room for `new` keys after the run (a new buffer shaped like `like_k` when full); returns
        the buffer position after the run."""
        held = 0 if self.run_k is None else self.run_k.shape[2]
        if self._buffer_k is None or self._offset + held + new > self._buffer_k.shape[2]:
            shape = (*like_k.shape[:2], max(2 * self.window, held + new), like_k.shape[3])
            buffer_k, buffer_v = like_k.new_empty(shape), like_v.new_empty(shape)
            if held:
                buffer_k[:, :, :held], buffer_v[:, :, :held] = self.run_k, self.run_v
            self._buffer_k, self._buffer_v, self._offset = buffer_k, buffer_v, 0
        return self._offset + held

    def _extend_run(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The run with the new keys written after it (in place while the buffer has room)."""
        end, new = self._make_room(k_BHTD.shape[2], k_BHTD, v_BHTD), k_BHTD.shape[2]
        self._buffer_k[:, :, end : end + new] = k_BHTD
        self._buffer_v[:, :, end : end + new] = v_BHTD
        return self._buffer_k[:, :, self._offset : end + new], self._buffer_v[:, :, self._offset : end + new]

    def _roll(self, run_k: torch.Tensor, run_v: torch.Tensor, new_length: int) -> None:
        """Keep the last window-1 keys; move strided keys that leave the run to the far store."""
        keep_from = max(self.run_start, new_length - (self.window - 1))
        if first_strided_position(self.run_start, self.stride) < keep_from:  # (checked in ints first: most decode steps evict nothing)
            evicted = strided_positions(self.run_start, keep_from, self.stride, run_k.device) - self.run_start
            far_k, far_v = run_k.index_select(2, evicted), run_v.index_select(2, evicted)
            self.far_k = far_k if self.far_k is None else torch.cat([self.far_k, far_k], 2)
            self.far_v = far_v if self.far_v is None else torch.cat([self.far_v, far_v], 2)
        cut = keep_from - self.run_start
        self.run_k, self.run_v = run_k[:, :, cut:], run_v[:, :, cut:]
        self._offset += cut
        self.run_start, self.length = keep_from, new_length

    def nbytes(self) -> int:
        """Bytes of cached keys and values held (run + strided store; the run's buffer has room
        for up to a window more)."""
        tensors = (self.run_k, self.run_v, self.far_k, self.far_v)
        return sum(t.nelement() * t.element_size() for t in tensors if t is not None)


class ModelCache(list):
    """One sequence's per-layer caches (a list, one entry per layer), and the plan of the fused
    decode step over the model that fills them, built on the first decode step (decode_step.py):
    a new cache per sequence means the plan always sees the model's current modules."""

    def __init__(self, layers: list) -> None:
        super().__init__(layers)
        self._plan, self._planned = None, False

    def plan_for(self, model, build):
        """build(model) the first time, then the same plan (None where the fused step does not apply)."""
        if not self._planned:
            self._plan, self._planned = build(model), True
        return self._plan

    def __deepcopy__(self, memo: dict) -> "ModelCache":
        """The layer caches copied; the copy builds its own plan (a C++ plan cannot be copied, and
        holds nothing of the sequence)."""
        return ModelCache([copy.deepcopy(layer, memo) for layer in self])
