"""The fused chunked cross-entropy equals PyTorch's cross-entropy on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import preset
from hybridlm.model import loss as loss_module
from hybridlm.model.loss import IGNORE_INDEX, chunked_cross_entropy
from hybridlm.model.transformer import HybridLM


@pytest.mark.parametrize("n,vocab,ignored", [(7, 11, 0), (300, 50, 40), (1, 5, 0), (64, 1000, 63)])
def test_loss_and_gradients_match_pytorch_fp32(monkeypatch, n, vocab, ignored):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 8 * vocab)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 16, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:ignored]] = IGNORE_INDEX
    ours = chunked_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.tensor(1.7)
    for got, want in zip(torch.autograd.grad(ours * upstream, (hidden, weight)),
                         torch.autograd.grad(ref * upstream, (hidden, weight))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_model_loss_equals_cross_entropy_of_its_logits_bf16_autocast():
    """Under bf16 autocast both ways round the projection to bf16; they agree to bf16 precision."""
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", vocab_size=512))
    ids = torch.randint(0, 512, (2, 65))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x, targets_BT=y)
        logits = model(x)
    plain = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    assert abs(fused.item() - plain.item()) < 2e-3 * plain.item()
    grads_fused = torch.autograd.grad(fused, list(model.parameters()))
    grads_plain = torch.autograd.grad(plain, list(model.parameters()))
    for got, want in zip(grads_fused, grads_plain):
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-6
