"""The block-wise sparse kernel equals dense SDPA with the equivalent boolean mask (outputs and grads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.model.attention import FLASH_BLOCK, blockwise_sparse_attention, fused_sparse_attention, sparse_causal_attention
from hybridlm.model.sparse_flash import SparseFlashAttention
from hybridlm.model.sparse_kernel_bf16 import SparseAttentionBF16, avx512_extension, brgemm_extension, kernel_applies
from reference import assert_same_with_grads, masked_sparse_attention, sparse_mask

# Both kernel paths, and the dispatcher the model calls (which picks one by length).
KERNELS = {"fused": fused_sparse_attention, "blockwise": blockwise_sparse_attention, "dispatch": sparse_causal_attention}


def _inputs(batch, heads, kv_heads, n, dim, n_global, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    if n_global:
        shapes += [(batch, kv_heads, n_global, dim)] * 2
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block, seed=0, kernel="fused"):
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = _inputs(batch, heads, kv_heads, n, dim, n_global, seed)
    q, k, v = tensors[:3]
    kg, vg = tensors[3:] if n_global else (None, None)
    out = KERNELS[kernel](q, k, v, window=window, stride=stride, k_extra_BHED=kg, v_extra_BHED=vg, block=block)
    rep = heads // kv_heads
    expand = (lambda t: t.repeat_interleave(rep, dim=1)) if rep > 1 else (lambda t: t)
    ref = masked_sparse_attention(
        q, expand(k), expand(v), window, stride, None if kg is None else expand(kg), None if vg is None else expand(vg)
    )
    assert_same_with_grads(out, ref, tensors, gen)


@pytest.mark.parametrize(
    "batch,heads,kv_heads,n,dim,window,stride,n_global,block",
    [
        (2, 4, 4, 100, 16, 8, 12, 3, 32),  # n not a multiple of the block
        (1, 2, 2, 37, 8, 64, 5, 2, 16),  # window >= n: plain causal plus globals
        (1, 2, 2, 50, 8, 6, 80, 0, 16),  # stride > n and no global slots: pure sliding window
        (3, 4, 2, 65, 8, 10, 7, 4, 128),  # grouped-query attention, one block
        (1, 1, 1, 1, 8, 1, 1, 1, 8),  # a single token, window 1
        (2, 2, 1, 130, 8, 1, 3, 0, 17),  # window 1: only self + strided columns
        (1, 2, 2, 1100, 8, 40, 30, 2, 64),  # long enough for the dispatcher's fused path
    ],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_sparse_matches_masked_dense(batch, heads, kv_heads, n, dim, window, stride, n_global, block, kernel):
    _check(batch, heads, kv_heads, n, dim, window, stride, n_global, block, kernel=kernel)


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
    kernel=st.sampled_from(sorted(KERNELS)),
)
def test_sparse_matches_masked_dense_random_shapes(batch, heads, n, window, stride, n_global, block, seed, kernel):
    _check(batch, heads, heads, n, 8, window, stride, n_global, block, seed, kernel)


def _cpp_kernel(*args):
    if not kernel_applies(torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)):
        pytest.skip("the C++ kernel needs a CPU with avx512_bf16 and a C++ compiler")
    return SparseAttentionBF16.apply(*args)


def _brgemm():
    """The AMX path's kernel, forced: it runs on any AVX-512 BF16 CPU (oneDNN's brgemm takes AVX-512
    BF16 where the CPU has no AMX), so these tests check its layouts and masks on every such CPU."""
    module = brgemm_extension(("amx", "avx512_bf16"))
    if module is None:
        pytest.skip("the brgemm kernel needs a CPU with avx512_bf16 and a C++ compiler")
    return module


def _brgemm_kernel(*args):
    return SparseAttentionBF16.apply(*args, _brgemm())


BF16_KERNELS = {"pytorch-kernel": SparseFlashAttention.apply, "cpp": _cpp_kernel, "brgemm": _brgemm_kernel}
BF16_MODULES = {"pytorch-kernel": lambda: None, "cpp": avx512_extension, "brgemm": _brgemm}


def _block(module, n: int, window: int) -> int:
    """The query block a layer calls the kernel `module` with: its dense_block for dense layers
    (window >= n: 256 rows for the brgemm kernel, so its partial row and K tiles are covered), else FLASH_BLOCK."""
    return module.dense_block if module is not None and window >= n else FLASH_BLOCK


@pytest.mark.parametrize("kernel", BF16_KERNELS)
@pytest.mark.parametrize(
    "n,window,stride,n_global",
    [(300, 64, 32, 4), (1000, 128, 128, 8), (130, 16, 200, 0), (77, 200, 3, 0), (1, 4, 4, 2), (515, 7, 5, 3),
     (1100, 1100, 1101, 0),  # dense causal attention, as dense layers call the kernel: 3 span key chunks
     (1600, 16, 2, 8)],  # 808 remote keys: the C++ backward walks them in 2 key chunks
)
def test_bf16_fused_is_as_accurate_as_pytorch_bf16_attention(n, window, stride, n_global, kernel):
    """bf16 tolerance, justified by a peer: PyTorch's own fused bf16 CPU attention, run densely with
    the same mask. Against an fp32 reference, our mean error may be at most 1.5x the peer's and our
    worst relative error at most 3x the peer's. bf16 keeps 8 significant bits, so each rounding
    costs up to 2^-9 relative; our paths round once more than the peer (the PyTorch-kernel path
    rounds each key set's output before the exact log-sum-exp merge; our AVX-512 kernel rounds the
    normalised probabilities before P.V, the brgemm kernel the unnormalised ones as the peer does)."""
    tensors = _inputs(2, 4, 4, n, 64, n_global, seed=7, dtype=torch.bfloat16)
    q, k, v = tensors[:3]
    kg, vg = tensors[3:] if n_global else (None, None)
    upstream = torch.randn(2, 4, n, 64, generator=torch.Generator().manual_seed(3))

    def run(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() for t in tensors]
        out = fn(*ins)
        return [out, *torch.autograd.grad((out.float() * upstream).sum(), ins)]

    block = _block(BF16_MODULES[kernel](), n, window)

    def fused(q, k, v, *g):
        return BF16_KERNELS[kernel](q, k, v, *(g or (None, None)), window, stride, block)

    def masked(q, k, v, *g):
        return masked_sparse_attention(q, k, v, window, stride, *(g or (None, None)))

    def pytorch_fused_dense(q, k, v, *g):
        if g:
            k, v = torch.cat([g[0], k], 2), torch.cat([g[1], v], 2)
        visible = sparse_mask(n, window, stride, n_global)
        additive = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive)[0]

    reference = run(masked, torch.float32)
    ours, theirs = run(fused, torch.bfloat16), run(pytorch_fused_dense, torch.bfloat16)
    for want, got, peer in zip(reference, ours, theirs):
        our_err, peer_err = (got.float() - want).abs(), (peer.float() - want).abs()
        assert our_err.mean() <= 1.5 * peer_err.mean(), (our_err.mean().item(), peer_err.mean().item())
        scale = want.abs() + want.abs().mean()  # near-zero elements are not held to zero error
        our_rel, peer_rel = (our_err / scale).max().item(), (peer_err / scale).max().item()
        assert our_rel <= 3 * peer_rel, (tuple(want.shape), our_rel, peer_rel)


@pytest.mark.parametrize(
    "n,dim,window,stride,n_global",
    [(5000, 64, 256, 64, 8),  # long: the remote segment spans several 64-key tiles
     (2100, 128, 2100, 2101, 0),  # dense causal at head dim 128: two 64-dim blocks
     (333, 32, 40, 7, 3)],  # odd length, head dim 32
)
def test_the_brgemm_kernel_matches_ours_where_the_reference_is_too_big(n, dim, window, stride, n_global):
    """The two C++ kernels cross-checked where a dense fp32 reference would not fit. Each rounds the
    probabilities to bf16 once, differently: ours after normalising them, the brgemm kernel's online
    softmax before (as PyTorch's flash attention does), dividing by the row sum at the end. So they
    agree to two bf16 roundings of a result (2^-7 relative to its largest entry), and dQ, which also
    carries O's rounding through delta = rowsum(dO * O), to 2^-6; a wrong mask or tile is O(1)."""
    if not kernel_applies(torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)):
        pytest.skip("the C++ kernel needs a CPU with avx512_bf16 and a C++ compiler")
    tensors = _inputs(1, 3, 3, n, dim, n_global, seed=11, dtype=torch.bfloat16)
    upstream = torch.randn(1, 3, n, dim, generator=torch.Generator().manual_seed(5)).bfloat16()

    def run(kernel):  # each with the block a layer would give it (the dense case: 64 and 256 rows)
        ins = [t.detach().requires_grad_() for t in tensors]
        glob = ins[3:] if n_global else (None, None)
        out = SparseAttentionBF16.apply(*ins[:3], *glob, window, stride, _block(kernel, n, window), kernel)
        return [out, *torch.autograd.grad(out, ins, upstream)]

    names = ("out", "dq", "dk", "dv", "dkg", "dvg")
    for name, ours, theirs in zip(names, run(avx512_extension()), run(_brgemm())):
        bound = 2**-6 if name == "dq" else 2**-7
        assert (ours.float() - theirs.float()).abs().max() <= bound * theirs.float().abs().max(), name


def test_reference_mask_matches_the_definition():
    """Spot-check the reference itself against DESIGN.md's wording, position by position."""
    n, window, stride = 20, 4, 5
    mask = sparse_mask(n, window, stride, n_global=0)
    for i in range(n):
        for j in range(n):
            local = i - window + 1 <= j <= i
            strided = j < i - window + 1 and (j + 1) % stride == 0
            assert bool(mask[i, j]) == (local or strided), (i, j)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A process stopped while torch loads the kernel leaves its lock file; without this every
    later load in every process waits on it forever."""
    import os
    import time

    from hybridlm.model.cpu_kernels import STALE_LOCK_S, clear_stale_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "probe_ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not clear_stale_lock("probe_ext") and lock.exists()  # a build may hold it right now
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        assert clear_stale_lock("probe_ext")
    assert not lock.exists()
