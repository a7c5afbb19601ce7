"""Our RoPE (one fused rotation with its own backward) against Hugging Face Llama's apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

from hybridlm.model.positions import Rotary

HEAD_DIM, CONTEXT, THETA = 16, 96, 10000.0


def _hf_rotated(x_BHTD: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotation of x (B, H, T, D) at positions (B, T), in float64."""
    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=CONTEXT,
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
    torch.testing.assert_close(rotary.rotate_heads(x_BHTD.transpose(1, 2), 5).transpose(1, 2), rotary(x_BHTD, 5))
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
