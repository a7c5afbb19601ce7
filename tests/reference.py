"""Reference implementations used only by tests: dense attention with an explicit boolean mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_mask(n: int, window: int, stride: int, n_global: int, causal: bool = True) -> torch.Tensor:
    """The (n, n_global + n) boolean mask equivalent to the sparse pattern of DESIGN.md section 2.

    causal=False gives the symmetric pattern of bidirectional (masked LM) layers: |i - j| < window,
    or a strided summary column anywhere in the sequence.
    """
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if causal:
        local = (j <= i) & (j > i - window)
        strided = (j < i - window + 1) & ((j + 1) % stride == 0)
    else:
        local = (i - j).abs() < window
        strided = (j + 1) % stride == 0
    return torch.cat([torch.ones(n, n_global, dtype=torch.bool), local | strided], dim=1)


def masked_sparse_attention(q, k, v, window, stride, k_global=None, v_global=None, causal=True):
    """Dense SDPA with the full sparse mask; global slots prepended as always-visible keys."""
    n_global = 0 if k_global is None else k_global.shape[2]
    if k_global is not None:
        k, v = torch.cat([k_global, k], 2), torch.cat([v_global, v], 2)
    mask = sparse_mask(q.shape[2], window, stride, n_global, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def assert_same_with_grads(out, ref, tensors, gen, tol: float = 1e-5) -> None:
    """`out` equals `ref`, and so do their gradients w.r.t. `tensors` under one random upstream
    gradient (fp32 tolerance)."""
    upstream = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * upstream).sum(), tensors)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), tensors)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
