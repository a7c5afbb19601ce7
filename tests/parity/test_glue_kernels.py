"""The C++ glue kernels (glue_kernels_bf16.py: SwiGLU, GELU, RMSNorm, the cross-entropy's softmax) against
float64 references, on the avx512_bf16 path and on PyTorch's ops (HYBRIDLM_KERNEL=torch).

Tolerances: the kernels compute in fp32 and round each bf16 result once, so they stay within one
bf16 rounding (2^-8 relative) of the float64 value; PyTorch's bf16 SwiGLU rounds twice (silu, then
the product), hence 2^-7 there. Gradients that pass through a cancellation (silu' crosses zero)
get an absolute allowance of 1e-3 of their largest value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.errors import UserError
from hybridlm.model import loss as loss_module
from hybridlm.model.cpu_kernels import kernel_path
from hybridlm.model.glue_kernels_bf16 import (
    cross_entropy_kernel_applies,
    norm_kernel_applies,
    activation_kernel_applies,
)
from hybridlm.model.loss import IGNORE_INDEX, chunked_cross_entropy
from hybridlm.model.transformer import ACTIVATIONS, LayerNorm, RMSNorm

ONE_ROUNDING = 2.0**-8


@pytest.fixture(params=["avx512_bf16", "torch"])
def path(request, monkeypatch) -> str:
    monkeypatch.setenv("HYBRIDLM_KERNEL", request.param)
    try:
        kernel_path()
    except UserError:
        pytest.skip(f"this CPU cannot run the {request.param} kernel path")
    return request.param


def _within(got: torch.Tensor, exact: torch.Tensor, relative: float, share_of_max: float = 0.0) -> bool:
    error = (got.double() - exact).abs()
    return bool((error <= relative * exact.abs() + share_of_max * exact.abs().max() + 1e-30).all())


@pytest.mark.parametrize("width", [1024, 100])  # 100: a tail past the 16-wide loop
def test_swiglu_and_its_gradient(path, width):
    gen = torch.Generator().manual_seed(width)
    x = (3 * torch.randn(2, 33, 2 * width, generator=gen)).bfloat16().requires_grad_()
    assert activation_kernel_applies(x) == (path == "avx512_bf16")
    y = ACTIVATIONS["swiglu"](x)
    grad_y = torch.randn(y.shape, generator=gen).bfloat16()
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    x64 = x.detach().double().requires_grad_()
    gate, up = x64.chunk(2, dim=-1)
    exact = F.silu(gate) * up
    (exact_grad,) = torch.autograd.grad(exact, x64, grad_y.double())
    assert y.dtype is torch.bfloat16 and y.shape == exact.shape
    assert _within(y, exact, ONE_ROUNDING if path == "avx512_bf16" else 2 * ONE_ROUNDING)
    assert _within(grad_x, exact_grad, 2 * ONE_ROUNDING, share_of_max=1e-3)


@pytest.mark.parametrize("shape", [(2, 33, 1536), (5, 7)])  # (5, 7): fewer values than one 16-wide step
def test_gelu_tanh_and_its_gradient(path, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).bfloat16().requires_grad_()
    assert activation_kernel_applies(x) == (path == "avx512_bf16")
    y = ACTIVATIONS["gelu_tanh"](x)
    grad_y = torch.randn(y.shape, generator=gen).bfloat16()
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    x64 = x.detach().double().requires_grad_()
    exact = F.gelu(x64, approximate="tanh")  # PyTorch's float64 op: an independent formula from ours
    (exact_grad,) = torch.autograd.grad(exact, x64, grad_y.double())
    assert y.dtype is torch.bfloat16 and y.shape == exact.shape
    # y = x sigmoid(2u) is a product, accurate relative to itself, except where float64's own
    # 1 + tanh(u) rounds to 0 (x < -6): 1e-6 of the largest value absolute; the slope passes through
    # a cancellation near x = -0.75, hence the gradient's larger absolute allowance
    assert _within(y, exact, ONE_ROUNDING, share_of_max=1e-6)
    assert _within(grad_x, exact_grad, 2 * ONE_ROUNDING, share_of_max=1e-3)


def _exact_norm(kind: str, x64, w64, b64):
    """The float64 norm, written out (not PyTorch's module): RMSNorm, or LayerNorm with(out) a bias."""
    if kind == "rmsnorm":
        return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    centered = x64 - x64.mean(-1, keepdim=True)
    y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    return y if b64 is None else y + b64


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "layernorm-nobias"])
@pytest.mark.parametrize("width", [384, 70])
def test_norm_under_bf16_autocast_and_its_gradients(path, kind, width):
    """A training step's norm: fp32 rows and weight under bf16 autocast, the output feeding a matmul."""
    gen = torch.Generator().manual_seed(width)
    norm = RMSNorm(width, eps=1e-5) if kind == "rmsnorm" else LayerNorm(width, eps=1e-5, bias=kind == "layernorm")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width, generator=gen))
        if kind == "layernorm":
            norm.bias.copy_(0.5 * torch.randn(width, generator=gen))
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    x = (2 * torch.randn(3, 17, width, generator=gen) + 0.7).requires_grad_()  # an offset, for LayerNorm's mean
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm_kernel_applies(x, norm.weight, getattr(norm, "bias", None)) == (path == "avx512_bf16")
        y = norm(x)
    grad_y = torch.randn(y.shape, generator=gen).to(y.dtype)
    grads = torch.autograd.grad(y, (x, *params), grad_y)
    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    exact = _exact_norm(kind, x64, params64[0], params64[1] if len(params64) > 1 else None)
    exact_grads = torch.autograd.grad(exact, (x64, *params64), grad_y.double())
    assert _within(y.to(torch.bfloat16), exact, 2 * ONE_ROUNDING)  # PyTorch's way rounds twice
    for got, want in zip(grads, exact_grads, strict=True):
        assert got.dtype is torch.float32
        assert _within(got, want, 1e-4, share_of_max=1e-5)


def test_rms_norm_leaves_fp32_steps_and_bf16_models_to_pytorch():
    norm = RMSNorm(64, eps=1e-5)
    x = torch.randn(4, 64)
    assert not norm_kernel_applies(x, norm.weight)  # no autocast: an fp32 step
    assert torch.equal(norm(x), torch.nn.RMSNorm(64, eps=1e-5)(x))


@pytest.mark.parametrize("n,vocab,ignored", [(300, 1000, 40), (7, 70, 0)])
def test_bf16_cross_entropy_and_its_gradients(path, monkeypatch, n, vocab, ignored):
    """bf16 hidden states and weights (autocast's view), several chunks with a partial last one:
    the loss against float64 cross-entropy of the same bf16 logits; the gradients (bf16 matmuls of
    the once-rounded logit gradient) within bf16 precision of float64's."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * vocab)
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 48, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, 48, generator=gen) / 4).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:ignored]] = IGNORE_INDEX
    assert cross_entropy_kernel_applies(hidden @ weight.T) == (path == "avx512_bf16")
    ours = chunked_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(ours, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = (hidden @ weight.T).double()  # the bf16 logits both paths see
    exact = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    assert abs(ours.item() - exact.item()) <= 1e-5 * exact.item()
    exact_grads = torch.autograd.grad(F.cross_entropy(h64 @ w64.T, targets, ignore_index=IGNORE_INDEX), (h64, w64))
    for got, want in zip(grads, exact_grads):
        assert (got.double() - want).norm() <= 0.01 * want.norm()
