"""Attention: dense and sparse (window + strided + global), causal or not, one call signature family.

Everything takes queries/keys/values shaped (batch, heads, time, head_dim). The sparse paths never
build a time x time tensor, so memory grows like T * (window + T/stride + n_global). Whole bf16
sequences on a CPU with AVX-512 BF16 go to our C++ kernel (dense causal attention is its special
case window >= T); the rest uses PyTorch SDPA. Bidirectional attention (masked language modelling)
never takes the fused paths, which are causal-only: dense layers call SDPA without a mask, sparse
layers the block loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.model.decode_kernel_bf16 import attention_applies, decode_attention_bf16
from hybridlm.model.sparse_flash import FAST_DTYPES, SparseFlashAttention
from hybridlm.model.sparse_kernel_bf16 import dense_block, kernel_applies, sparse_attention_bf16

DEFAULT_BLOCK = 256  # query block of the block loop; measured fastest of 64/128/256 at n = 256..1024
# query block of the fused paths' sparse layers (dense layers take the kernel's own dense_block);
# measured no slower than 32/128 at n = 1024..16384
FLASH_BLOCK = 64
FLASH_MIN_LEN = 1024  # below this, PyTorch-kernel path's two kernel calls cost more than the block loop
_dense_backend = {"name": "auto"}


def set_dense_backend(name: str) -> None:
    """'auto' (our kernel where it applies) or 'sdpa' (always PyTorch SDPA, e.g. as a benchmark peer)."""
    if name not in ("auto", "sdpa"):
        raise ValueError(f"dense backend must be auto or sdpa (got {name!r})")
    _dense_backend["name"] = name


def dense_causal_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """Causal attention where the T queries are the last T of the S keys."""
    n_query, n_key = q_BHTD.shape[2], k_BHSD.shape[2]
    gqa = q_BHTD.shape[1] != k_BHSD.shape[1]
    if n_query == n_key and _dense_backend["name"] == "auto" and kernel_applies(q_BHTD):
        n_head = q_BHTD.shape[1]
        k, v = _repeat_kv(k_BHSD, n_head).contiguous(), _repeat_kv(v_BHSD, n_head).contiguous()
        return sparse_attention_bf16(q_BHTD.contiguous(), k, v, None, None, n_key, n_key + 1, dense_block())
    if n_query == n_key:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True, enable_gqa=gqa)
    if n_query == 1:
        if _dense_backend["name"] == "auto" and attention_applies(q_BHTD, [k_BHSD]):
            return decode_attention_bf16(q_BHTD, [k_BHSD], [v_BHSD])
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, enable_gqa=gqa)
    offset = n_key - n_query
    q_pos = torch.arange(offset, n_key, device=q_BHTD.device)
    mask_TS = torch.arange(n_key, device=q_BHTD.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask_TS, enable_gqa=gqa)


def dense_bidirectional_attention(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
    """Every query sees every key (masked language modelling): plain SDPA, as our kernel is causal-only."""
    gqa = q_BHTD.shape[1] != k_BHTD.shape[1]
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, enable_gqa=gqa)


def sparse_causal_attention(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    *,
    window: int,
    stride: int,
    q_start: int = 0,
    k_start: int = 0,
    k_extra_BHED: torch.Tensor | None = None,
    v_extra_BHED: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Sparse causal attention over a contiguous run of keys plus always-visible extra keys.

    Queries sit at absolute positions q_start.., keys of the run at k_start.. (k_start <= q_start,
    the run reaching the last query). Query i sees run key j when j <= i and either
    j > i - window (local) or (j + 1) % stride == 0 (strided summary). The extra keys (the
    layer's global slots, and during decoding the strided entries evicted from the run) are
    visible to every query. Training calls this with q_start = k_start = 0.

    Whole sequences on the CPU take a fused path: our C++ kernel in bf16 (sparse_kernel_bf16.py), or
    PyTorch's fused kernel per key set (sparse_flash.py) for fp32 and where the C++ kernel cannot
    be built. Other calls (decoding with a cache, other devices or dtypes) take the block loop,
    which is also the only path for bidirectional attention (blockwise_sparse_attention, causal=False).
    """
    if _fused_path_applies(q_BHTD, k_BHSD, q_start, k_start):
        return fused_sparse_attention(
            q_BHTD, k_BHSD, v_BHSD, window=window, stride=stride, k_extra_BHED=k_extra_BHED, v_extra_BHED=v_extra_BHED
        )
    return blockwise_sparse_attention(
        q_BHTD, k_BHSD, v_BHSD, window=window, stride=stride, q_start=q_start, k_start=k_start,
        k_extra_BHED=k_extra_BHED, v_extra_BHED=v_extra_BHED, block=block,
    )


def _fused_path_applies(q: torch.Tensor, k: torch.Tensor, q_start: int, k_start: int) -> bool:
    whole = q_start == 0 and k_start == 0 and q.shape[2] == k.shape[2] and k.dtype == q.dtype
    if not whole or q.device.type != "cpu":
        return False
    return kernel_applies(q) or (q.dtype in FAST_DTYPES and q.shape[2] >= FLASH_MIN_LEN)


def fused_sparse_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    window: int,
    stride: int,
    k_extra_BHED: torch.Tensor | None = None,
    v_extra_BHED: torch.Tensor | None = None,
    block: int = FLASH_BLOCK,
) -> torch.Tensor:
    """Whole-sequence sparse attention: our C++ bf16 kernel where it applies (sparse_kernel_bf16.py),
    else PyTorch's fused CPU kernel per key set (sparse_flash.py)."""
    n_head = q_BHTD.shape[1]
    k_BHTD, v_BHTD = _repeat_kv(k_BHTD, n_head).contiguous(), _repeat_kv(v_BHTD, n_head).contiguous()
    if k_extra_BHED is not None:
        k_extra_BHED = _repeat_kv(k_extra_BHED, n_head).contiguous()
        v_extra_BHED = _repeat_kv(v_extra_BHED, n_head).contiguous()
    function = sparse_attention_bf16 if kernel_applies(q_BHTD) else SparseFlashAttention.apply
    return function(q_BHTD.contiguous(), k_BHTD, v_BHTD, k_extra_BHED, v_extra_BHED, window, stride, block)


def blockwise_sparse_attention(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    *,
    window: int,
    stride: int,
    q_start: int = 0,
    k_start: int = 0,
    k_extra_BHED: torch.Tensor | None = None,
    v_extra_BHED: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    causal: bool = True,
) -> torch.Tensor:
    """The general block loop: one SDPA call per query block over the keys it can see.

    With causal=False the pattern is symmetric (query i sees run key j when |i - j| < window or
    (j + 1) % stride == 0, anywhere in the run), for masked language modelling. The fused paths
    are causal-only, so this loop is the one bidirectional sparse path.
    """
    n_head = q_BHTD.shape[1]
    k_BHSD, v_BHSD = _repeat_kv(k_BHSD, n_head), _repeat_kv(v_BHSD, n_head)
    if k_extra_BHED is not None:
        k_extra_BHED, v_extra_BHED = _repeat_kv(k_extra_BHED, n_head), _repeat_kv(v_extra_BHED, n_head)
    n_query, k_stop = q_BHTD.shape[2], k_start + k_BHSD.shape[2]
    outs = []
    for b0 in range(0, n_query, block):
        b1 = min(b0 + block, n_query)
        first, last = q_start + b0, q_start + b1 - 1  # absolute positions of the block's queries
        span_start = max(k_start, first - window + 1)
        span_stop = last + 1 if causal else min(k_stop, last + window)  # exclusive
        far_pos = strided_positions(k_start, span_start, stride, q_BHTD.device)
        if not causal:  # summary columns after the span are visible too
            far_pos = torch.cat([far_pos, strided_positions(span_stop, k_stop, stride, q_BHTD.device)])
        far_idx = far_pos - k_start
        span = slice(span_start - k_start, span_stop - k_start)
        keys = [k_BHSD.index_select(2, far_idx), k_BHSD[:, :, span]]
        values = [v_BHSD.index_select(2, far_idx), v_BHSD[:, :, span]]
        if k_extra_BHED is not None:
            keys.insert(0, k_extra_BHED)
            values.insert(0, v_extra_BHED)
        n_always = sum(t.shape[2] for t in keys[:-1])
        mask = _block_mask(first, last, span_start, span_stop, n_always, window, stride, causal, q_BHTD.device)
        q_blk = q_BHTD[:, :, b0:b1]
        outs.append(F.scaled_dot_product_attention(q_blk, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask))
    return torch.cat(outs, dim=2)


def _repeat_kv(x_BHSD: torch.Tensor, n_head: int) -> torch.Tensor:
    """Grouped-query attention: share each key/value head across n_head / n_kv_head query heads."""
    n_kv = x_BHSD.shape[1]
    return x_BHSD if n_kv == n_head else x_BHSD.repeat_interleave(n_head // n_kv, dim=1)


def first_strided_position(begin: int, stride: int) -> int:
    """The first absolute position p >= begin with (p + 1) % stride == 0."""
    return begin + (-(begin + 1)) % stride


def strided_positions(begin: int, end: int, stride: int, device: torch.device) -> torch.Tensor:
    """Absolute positions p in [begin, end) with (p + 1) % stride == 0."""
    first = first_strided_position(begin, stride)
    return torch.arange(first, max(first, end), stride, device=device)


def _block_mask(
    first: int,
    last: int,
    span_start: int,
    span_stop: int,
    n_always: int,
    window: int,
    stride: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Mask (queries, n_always + span keys): always-visible columns, then the local/strided span."""
    q_pos = torch.arange(first, last + 1, device=device)[:, None]
    k_pos = torch.arange(span_start, span_stop, device=device)[None, :]
    strided = (k_pos + 1) % stride == 0
    if causal:
        visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) | strided)
    else:
        visible = ((k_pos - q_pos).abs() < window) | strided
    always = torch.ones(q_pos.shape[0], n_always, dtype=torch.bool, device=device)
    return torch.cat([always, visible], dim=1)
