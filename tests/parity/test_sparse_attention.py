"""The block-wise sparse kernel equals dense SDPA with the equivalent boolean mask (outputs and grads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.model.attention import sparse_causal_attention
from reference import masked_sparse_attention, sparse_mask


def _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen, requires_grad=True)
    kg = torch.randn(batch, kv_heads, n_global, dim, generator=gen) if n_global else None
    vg = torch.randn(batch, kv_heads, n_global, dim, generator=gen) if n_global else None
    out = sparse_causal_attention(q, k, v, window=window, stride=stride, k_extra_BHED=kg, v_extra_BHED=vg, block=block)
    rep = heads // kv_heads
    expand = (lambda t: t.repeat_interleave(rep, dim=1)) if rep > 1 else (lambda t: t)
    ref = masked_sparse_attention(
        q, expand(k), expand(v), window, stride, None if kg is None else expand(kg), None if vg is None else expand(vg)
    )
    upstream = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * upstream).sum(), [q, k, v])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [q, k, v])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "batch,heads,kv_heads,n,dim,window,stride,n_global,block",
    [
        (2, 4, 4, 100, 16, 8, 12, 3, 32),  # n not a multiple of the block
        (1, 2, 2, 37, 8, 64, 5, 2, 16),  # window >= n: plain causal plus globals
        (1, 2, 2, 50, 8, 6, 80, 0, 16),  # stride > n and no global slots: pure sliding window
        (3, 4, 2, 65, 8, 10, 7, 4, 128),  # grouped-query attention, one block
        (1, 1, 1, 1, 8, 1, 1, 1, 8),  # a single token, window 1
        (2, 2, 1, 130, 8, 1, 3, 0, 17),  # window 1: only self + strided columns
    ],
)
def test_sparse_matches_masked_dense(batch, heads, kv_heads, n, dim, window, stride, n_global, block):
    _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    n=st.integers(1, 150),
    window=st.integers(1, 160),
    stride=st.integers(1, 160),
    n_global=st.integers(0, 4),
    block=st.integers(1, 70),
    seed=st.integers(0, 1000),
)
def test_sparse_matches_masked_dense_random_shapes(batch, heads, n, window, stride, n_global, block, seed):
    _check(batch, heads, heads, n, 8, window, stride, n_global, block, seed)


def test_reference_mask_matches_the_definition():
    """Spot-check the reference itself against DESIGN.md's wording, position by position."""
    n, window, stride = 20, 4, 5
    mask = sparse_mask(n, window, stride, n_global=0)
    for i in range(n):
        for j in range(n):
            local = i - window + 1 <= j <= i
            strided = j < i - window + 1 and (j + 1) % stride == 0
            assert bool(mask[i, j]) == (local or strided), (i, j)
