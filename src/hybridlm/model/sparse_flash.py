"""Fast sparse attention for whole sequences, built on PyTorch's fused CPU flash-attention kernel.

The sparse pattern is split into three disjoint key sets, each handed to the fused kernel, which
returns its output and log-sum-exp (LSE):
- local: each block of B queries with the m = ceil((w-1)/B) blocks before it and itself, under a
  small per-block mask (window, causality, strided columns inside the span);
- far strided: every strided key before the block's span, for all queries at once;
- global: the layer's learned slots, visible to every query.
The partial outputs merge exactly through their LSEs. The backward pass calls the fused kernel's
backward once per key set with the *merged* output and LSE, which yields exact gradients for that
set (the ring-attention identity), so nothing of size n x n or n x keys is ever stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
FAST_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class _Plan:
    """Shapes and masks for one (n, window, stride, n_global, block) geometry; cached and reused."""

    n: int
    block: int
    n_blocks: int
    back: int  # previous blocks the window reaches: the local span is back + 1 blocks
    local_mask: torch.Tensor  # (1, n_blocks, block, span) additive, broadcast over batch*heads
    far_positions: torch.Tensor  # strided key positions that some query sees outside its span
    remote_start: int  # first query that sees any remote key (global slot or far strided key)
    remote_mask: torch.Tensor | None  # (n - remote_start, n_global + n_far) additive; None: no remote keys

    @property
    def n_pad(self) -> int:
        return self.n_blocks * self.block


@lru_cache(maxsize=64)
def _plan(n: int, window: int, stride: int, n_global: int, block: int, dtype: torch.dtype) -> _Plan:
    n_blocks = -(-n // block)
    back = -(-(window - 1) // block)
    span = (back + 1) * block
    q_pos = torch.arange(n_blocks * block).view(n_blocks, block, 1)
    span_start = (torch.arange(n_blocks) - back).view(n_blocks, 1, 1) * block
    k_pos = span_start + torch.arange(span).view(1, 1, span)
    visible = (k_pos >= 0) & (k_pos <= q_pos) & ((k_pos > q_pos - window) | ((k_pos + 1) % stride == 0))
    strided = torch.arange(stride - 1, max(stride - 1, n), stride)
    q_span_start = (torch.arange(n) // block - back) * block
    sees_far = strided.view(1, -1) < q_span_start.view(-1, 1)  # far strided keys lie before the span
    far_positions = strided[: int(sees_far.sum(1).max()) if n else 0]
    remote = torch.cat([torch.ones(n, n_global, dtype=torch.bool), sees_far[:, : len(far_positions)]], dim=1)
    sees_any = remote.any(dim=1)
    remote_start = int(sees_any.nonzero()[0]) if sees_any.any() else n  # rows before it would be all-masked
    remote_mask = _additive(remote[remote_start:], dtype) if remote_start < n else None
    local_mask = _additive(visible, dtype).unsqueeze(0)
    return _Plan(n, block, n_blocks, back, local_mask, far_positions, remote_start, remote_mask)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


def _pad_seq(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad dim 2 of (B, H, n, ...) or (B, H, n)."""
    if not (front or back):
        return x
    pad = (front, back) if x.dim() == 3 else (0, 0, front, back)
    return torch.nn.functional.pad(x, pad)


def _query_blocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(B, H, n, ...) -> (B*H, n_blocks, block, ...): a view once padded to whole blocks."""
    x = _pad_seq(x, 0, plan.n_pad - plan.n).contiguous()
    return x.view(x.shape[0] * x.shape[1], plan.n_blocks, plan.block, *x.shape[3:])


def _key_spans(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(B, H, n, D) -> (B*H, n_blocks, span, D): overlapping strided views, nothing copied per block."""
    B, H, _, D = x.shape
    padded = _pad_seq(x, plan.back * plan.block, plan.n_pad - plan.n).contiguous().view(B * H, -1, D)
    shape = (B * H, plan.n_blocks, (plan.back + 1) * plan.block, D)
    return padded.as_strided(shape, (padded.stride(0), plan.block * D, D, 1))


def _fold_spans(grad: torch.Tensor, plan: _Plan, batch: int) -> torch.Tensor:
    """Adjoint of _key_spans: sum each span's gradient back onto its key positions."""
    bh, _, _, D = grad.shape
    total = grad.new_zeros(bh, (plan.n_blocks + plan.back) * plan.block, D, dtype=torch.float32)
    for r in range(plan.back + 1):  # sub-block r of block b's span is key block b - back + r
        piece = grad[:, :, r * plan.block : (r + 1) * plan.block].reshape(bh, plan.n_pad, D)
        total[:, r * plan.block : r * plan.block + plan.n_pad] += piece
    start = plan.back * plan.block
    return total[:, start : start + plan.n].view(batch, bh // batch, plan.n, D)


def _unblock(x: torch.Tensor, plan: _Plan, batch: int) -> torch.Tensor:
    """(B*H, n_blocks, block, ...) -> (B, H, n, ...)."""
    x = x.reshape(batch, x.shape[0] // batch, plan.n_pad, *x.shape[3:])
    return x[:, :, : plan.n]


class SparseFlashAttention(torch.autograd.Function):
    """Exact sparse causal attention (window + strided + global) over a whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, window: int, stride: int, block: int):
        batch, _, n, _ = q.shape
        n_global = 0 if k_global is None else k_global.shape[2]
        plan = _plan(n, window, stride, n_global, block, q.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        o_loc, lse_loc = _flash(_query_blocks(q, plan), _key_spans(k, plan), _key_spans(v, plan),
                                attn_mask=plan.local_mask, scale=scale)
        out, lse = _unblock(o_loc, plan, batch), _unblock(lse_loc, plan, batch)
        if plan.remote_mask is not None:
            k_rem, v_rem = _remote_keys(k, k_global, plan), _remote_keys(v, v_global, plan)
            s = plan.remote_start
            o_rem, lse_rem = _flash(q[:, :, s:], k_rem, v_rem, attn_mask=plan.remote_mask, scale=scale)
            out, lse = out.float(), lse.clone()
            out[:, :, s:], lse[:, :, s:] = _merge(out[:, :, s:], lse[:, :, s:], o_rem, lse_rem)
        out = out.to(q.dtype).contiguous()
        lse = lse.contiguous()
        ctx.save_for_backward(q, k, v, k_global, v_global, out, lse)
        ctx.geometry = (window, stride, block, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_global, v_global, out, lse = ctx.saved_tensors
        window, stride, block, scale = ctx.geometry
        batch, n = q.shape[0], q.shape[2]
        n_global = 0 if k_global is None else k_global.shape[2]
        plan = _plan(n, window, stride, n_global, block, q.dtype)
        grad_out = grad_out.contiguous()
        dq, dk_spans, dv_spans = _flash_backward(
            _query_blocks(grad_out, plan), _query_blocks(q, plan), _key_spans(k, plan), _key_spans(v, plan),
            _query_blocks(out, plan), _query_blocks(lse, plan), 0.0, False, attn_mask=plan.local_mask, scale=scale,
        )
        dq = _unblock(dq, plan, batch).float()
        dk, dv = _fold_spans(dk_spans, plan, batch), _fold_spans(dv_spans, plan, batch)
        dkg = dvg = None
        if plan.remote_mask is not None:
            k_rem, v_rem = _remote_keys(k, k_global, plan), _remote_keys(v, v_global, plan)
            s = plan.remote_start
            dq_r, dk_r, dv_r = _flash_backward(grad_out[:, :, s:], q[:, :, s:], k_rem, v_rem, out[:, :, s:],
                                               lse[:, :, s:], 0.0, False, attn_mask=plan.remote_mask, scale=scale)
            dq[:, :, s:] += dq_r
            dk[:, :, plan.far_positions] += dk_r[:, :, n_global:]
            dv[:, :, plan.far_positions] += dv_r[:, :, n_global:]
            if n_global:
                dkg, dvg = dk_r[:, :, :n_global], dv_r[:, :, :n_global]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkg, dvg, None, None, None


def _remote_keys(x: torch.Tensor, x_global: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """The keys (or values) every block reaches outside its span: global slots, then far strided."""
    far = x[:, :, plan.far_positions]
    return far if x_global is None else torch.cat([x_global, far], dim=2)


def _merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Combine attentions over two disjoint key sets through their log-sum-exps (fp32)."""
    lse = torch.logaddexp(lse1, lse2)
    out = o1.float() * torch.exp(lse1 - lse).unsqueeze(-1) + o2.float() * torch.exp(lse2 - lse).unsqueeze(-1)
    return out, lse
