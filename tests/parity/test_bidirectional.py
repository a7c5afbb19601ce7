"""Bidirectional (masked LM) attention: the symmetric sparse block loop equals dense SDPA with the
explicit symmetric mask (outputs and grads), and causal=False lets the model look ahead."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_same_with_grads, masked_sparse_attention, sparse_mask

from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.model.attention import blockwise_sparse_attention


def _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    shapes += [(batch, kv_heads, n_global, dim)] * 2 if n_global else []
    tensors = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    q, k, v = tensors[:3]
    kg, vg = tensors[3:] if n_global else (None, None)
    out = blockwise_sparse_attention(
        q, k, v, window=window, stride=stride, k_extra_BHED=kg, v_extra_BHED=vg, block=block, causal=False
    )

    def expand(t):
        return None if t is None else t.repeat_interleave(heads // kv_heads, dim=1)

    ref = masked_sparse_attention(q, expand(k), expand(v), window, stride, expand(kg), expand(vg), causal=False)
    assert_same_with_grads(out, ref, tensors, gen)


@pytest.mark.parametrize(
    "batch,heads,kv_heads,n,dim,window,stride,n_global,block",
    [
        (2, 4, 4, 100, 16, 8, 12, 3, 32),  # n not a multiple of the block
        (1, 2, 2, 37, 8, 64, 5, 2, 16),  # window >= n: full attention plus globals
        (1, 2, 2, 50, 8, 6, 80, 0, 16),  # stride > n and no global slots: pure two-sided window
        (3, 4, 2, 65, 8, 10, 7, 4, 16),  # grouped-query attention over several blocks
        (2, 4, 1, 90, 8, 9, 11, 0, 8),  # one key/value head, no globals
        (1, 2, 2, 60, 8, 10, 6, 2, 4),  # blocks much smaller than the window: spans cross many blocks
        (2, 2, 1, 130, 8, 1, 3, 0, 17),  # window 1: only self + strided columns on both sides
        (1, 1, 1, 1, 8, 1, 1, 1, 8),  # a single token
    ],
)
def test_bidirectional_sparse_matches_masked_dense(batch, heads, kv_heads, n, dim, window, stride, n_global, block):
    _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads_kv=st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)]),
    n=st.integers(1, 120),
    window=st.integers(1, 130),
    stride=st.integers(1, 130),
    n_global=st.integers(0, 3),
    block=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_bidirectional_sparse_matches_masked_dense_random_shapes(batch, heads_kv, n, window, stride, n_global, block,
                                                                 seed):
    _check(batch, *heads_kv, n, 8, window, stride, n_global, block, seed)


def test_symmetric_reference_mask_matches_the_definition():
    """Spot-check the symmetric reference mask against the wording, position by position."""
    n, window, stride, n_global = 20, 4, 5, 2
    mask = sparse_mask(n, window, stride, n_global, causal=False)
    assert mask[:, :n_global].all()
    for i in range(n):
        for j in range(n):
            assert bool(mask[i, n_global + j]) == (abs(i - j) < window or (j + 1) % stride == 0), (i, j)


def _model(pattern: str, **kw) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=len(pattern), n_head=4, d_model=32, max_seq_len=64,
                      layer_pattern=pattern, window=6, stride=5, n_global=2, **kw)
    return HybridLM(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "position": "learned"}])
def test_bidirectional_model_sees_later_tokens_and_causal_does_not(kw):
    model = _model("DSS", **kw)
    ids = torch.randint(0, 97, (1, 40))
    changed = ids.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(model(changed, causal=False)[0, 0], model(ids, causal=False)[0, 0])
        torch.testing.assert_close(model(changed)[0, :30], model(ids)[0, :30], atol=0, rtol=0)


def test_one_sparse_layer_sees_exactly_the_symmetric_pattern():
    """Position 0 of a single bidirectional sparse layer depends on token j exactly when
    j < window or (j + 1) % stride == 0 (window 6, stride 5)."""
    model = _model("S")
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        base = model(ids, causal=False)[0, 0]
        for j in range(1, 40):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 1) % 97
            seen = not torch.equal(model(changed, causal=False)[0, 0], base)
            assert seen == (j < 6 or (j + 1) % 5 == 0), j


def test_bidirectional_forward_refuses_a_cache():
    model = _model("DS")
    with pytest.raises(ValueError, match="causal"):
        model(torch.zeros(1, 4, dtype=torch.long), model.new_cache(), causal=False)
