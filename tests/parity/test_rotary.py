"""Our RoPE (one fused rotation with its own backward) against Hugging Face Llama's apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

from hybridlm.errors import UserError
from hybridlm.model.cpu_kernels import kernel_path
from hybridlm.model.positions import Rotary
from hybridlm.model.glue_kernels_bf16 import rope_kernel_applies

HEAD_DIM, CONTEXT, THETA = 16, 96, 10000.0


def _hf_rotated(x_BHTD: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotation of x (B, H, T, D) at positions (B, T), in float64."""
    config = LlamaConfig(hidden_size=x_BHTD.shape[-1] * 4, num_attention_heads=4, max_position_embeddings=CONTEXT,
                         rope_theta=THETA)
    cos, sin = LlamaRotaryEmbedding(config)(x_BHTD.double(), positions_BT)
    rotated, _ = apply_rotary_pos_emb(x_BHTD.double(), x_BHTD.double(), cos.double(), sin.double())
    return rotated


@pytest.mark.parametrize("start", [0, 37])
def test_rotation_and_its_gradient_equal_hf_llama(start):
    torch.manual_seed(0)
    rotary = Rotary(HEAD_DIM, CONTEXT, THETA)
    x = torch.randn(2, 3, 11, HEAD_DIM, requires_grad=True)
    ours = rotary(x, start)
    theirs = _hf_rotated(x, torch.arange(start, start + 11).expand(2, -1))
    torch.testing.assert_close(ours.double(), theirs, atol=2e-6, rtol=0)
    grad = torch.randn_like(ours)
    ours_grad, = torch.autograd.grad(ours, x, grad)
    theirs_grad, = torch.autograd.grad(theirs, x, grad.double())
    torch.testing.assert_close(ours_grad.double(), theirs_grad.double(), atol=2e-6, rtol=0)


def test_backward_passes_gradcheck_in_float64():
    rotary = Rotary(HEAD_DIM, CONTEXT, THETA).double()
    x = torch.randn(1, 2, 5, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotary(t, 3), (x,))


def test_heads_inner_layout_and_per_row_positions_rotate_alike():
    """rotate_heads (B, T, heads, D) equals the (B, H, T, D) rotation, and a decode batch of rows at
    different positions equals each row rotated at its own."""
    torch.manual_seed(0)
    rotary = Rotary(HEAD_DIM, CONTEXT, THETA)
    x_BHTD = torch.randn(2, 4, 9, HEAD_DIM)
    theirs = _hf_rotated(x_BHTD, torch.arange(5, 14).expand(2, -1))
    torch.testing.assert_close(rotary.rotate_heads(x_BHTD.transpose(1, 2), 5).transpose(1, 2).double(), theirs,
                               atol=2e-6, rtol=0)
    rows_B1ND = torch.randn(3, 1, 4, HEAD_DIM)
    starts = [0, 7, 80]
    batched = rotary.rotate_heads(rows_B1ND, starts)
    theirs = _hf_rotated(rows_B1ND.transpose(1, 2), torch.tensor(starts)[:, None]).transpose(1, 2)
    torch.testing.assert_close(batched.double(), theirs, atol=2e-6, rtol=0)


def test_bf16_is_rotated_in_fp32_and_rounded_once():
    torch.manual_seed(0)
    rotary = Rotary(HEAD_DIM, CONTEXT, THETA)
    x = torch.randn(1, 2, 7, HEAD_DIM).bfloat16()
    ours = rotary(x, 4)
    assert ours.dtype is torch.bfloat16
    exact = _hf_rotated(x.float(), torch.arange(4, 11)[None])
    torch.testing.assert_close(ours, exact.to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("head_dim", [64, 40])  # 40: a half of 20 runs past the kernel's 16-wide loop
@pytest.mark.parametrize("path", ["avx512_bf16", "torch"])
def test_bf16_heads_of_the_fused_projection_rotate_alike_on_each_path(path, head_dim, monkeypatch):
    """q and k heads as a view into the qkv projection's output (not contiguous), in bf16: the C++
    kernel (avx512_bf16) and PyTorch's ops (torch) each give HF's float64 rotation rounded once
    (fp32 arithmetic may land a near-tie on the other side: within one bf16 rounding anywhere), and
    the gradient is the gradient rotated back."""
    monkeypatch.setenv("HYBRIDLM_KERNEL", path)
    try:
        kernel_path()
    except UserError:
        pytest.skip(f"this CPU cannot run the {path} kernel path")
    torch.manual_seed(0)
    rotary = Rotary(head_dim, CONTEXT, THETA)
    qkv = torch.randn(2, 9, 6, head_dim).bfloat16().requires_grad_()
    qk = qkv[:, :, :4]
    assert rope_kernel_applies(qk) == (path == "avx512_bf16")
    ours = rotary.rotate_heads(qk, 5)
    grad = torch.randn(ours.shape).bfloat16()
    ours.backward(grad)
    positions = torch.arange(5, 14).expand(2, -1)
    for got, exact in [(ours, _hf_rotated(qk.detach().transpose(1, 2), positions).transpose(1, 2)),
                       (qkv.grad[:, :, :4], _hf_rotated(grad.transpose(1, 2), -positions).transpose(1, 2))]:
        rounded = exact.to(torch.bfloat16).double()
        assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-30).all()
        assert (got.double() == rounded).double().mean() > 0.99
    assert not qkv.grad[:, :, 4:].any()  # the v heads got no gradient
